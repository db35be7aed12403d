"""What the split schemes share, so no piece of scheme logic lives in two files.

SplitScheme is the base of every split scheme (vanilla SL, SFL-V1/V2, PSL, EPSL). It knows
- placement: two-tier (client: first segment) or U-shaped (client: first and last segments and
  the labels; server: the middle; algorithms.md 3);
- the client's side of one iteration (1.3, and 3 when U-shaped);
- the server's side of one update over the batches of one or several clients (`server_update`,
  built from `server_forward` and `send_cut_grads`), which a scheme may override (EPSL does).
The serving orders a server can follow (`gather`: a barrier over all clients; `serve_fcfs`;
`serve_in_order`) and per-client server copies (`ServerCopies`) are plain helpers here; which
one a scheme uses is that scheme's business. Weights on the wire and FedAvg live in weights.py.

A relay (an intermediate tier of an N-segment chain, docs/multitier.md) holds server-side
segments, so it runs the server's round (`relay_round` is `server_round`) over the clients it
serves (`served`): the same serving order, the same per-client copies or shared model, the same
averaging; only where the server runs `server_update` a relay runs `relay_update` (`update`
picks): its segments forward and backward, activations up and gradients down, and when U-shaped
the server's last activation down to the client and its gradient back up. Upstream it speaks as
each client (ctx.proxies), so the next tier serves the clients unchanged. Segments a node holds
for the clients (SL's store, the fed server) are `client_segs`, from the run's placement.

Training semantics every scheme built on this base offers as options (and FL, fl.py):
- client_optimizer_reset, server_optimizer_reset: never | round | batch. When the optimizer
  state (SGD momentum) starts afresh: never (it persists across batches and rounds, and, in
  SFL and FL, across the FedAvg that replaces the weights it was built on), at the start of
  every round, or before every batch. The SplitFed reference code builds a new client
  optimizer each round and a new server optimizer each batch (client round, server batch).
  A server's "round" reset happens at its first update of the round, per optimizer (one per
  server copy in SFL-V1).
- epoch_rounds: a round is exactly one pass over the client's shard, a fresh shuffle each
  round and the last, partial batch kept (torch DataLoader's drop_last=False); every client's
  shard must then make the round's number of steps (ceil(shard / batch_size)). Off: batches
  of batch_size are drawn from a shuffled stream that drops the tail of each pass, so rounds
  drift against epochs.

Counters a server reports per round (ctx.count): server_steps (optimizer steps),
server_bp_vectors (output-gradient rows back-propagated), grad_rows_down and grad_bytes_down
(cut-gradient rows and message bytes sent to clients, a broadcast counted once); aggregators
add aggregations.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nodes.context import NodeContext
from nodes.protocol import Endpoint, Message
from nodes.schemes.base import Roles, Scheme
from nodes.schemes.weights import fedavg

Batch = list[tuple[str, Message]]  # (client, its ACT message), in server batch order

RESETS = ("never", "round", "batch")
# The training-semantics options (module doc); FL takes the client's and epoch_rounds.
TRAINING_OPTIONS = {"client_optimizer_reset": "never", "server_optimizer_reset": "never",
                    "epoch_rounds": False}
TRAINING_CHOICES = {"client_optimizer_reset": RESETS, "server_optimizer_reset": RESETS}


def client_batches(scheme: Scheme, ctx: NodeContext, rnd: int,
                   iters: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A client's batches of one round (epoch_rounds or the stream), its optimizers reset
    before each as client_optimizer_reset says."""
    mode = scheme.opts["client_optimizer_reset"]
    for step, xy in enumerate(ctx.batches(iters, epoch=scheme.opts["epoch_rounds"])):
        if mode == "batch" or (mode == "round" and step == 0):
            for o in ctx.optimizers.values():
                o.state.clear()
        yield xy


def reset_server_optimizers(scheme: Scheme, ctx: NodeContext,
                            opts: Sequence[torch.optim.Optimizer], rnd: int) -> None:
    """Before a server (or relay) update: server_optimizer_reset's fresh start, if due."""
    mode = scheme.opts.get("server_optimizer_reset", "never")
    if mode == "never":
        return
    done = getattr(scheme, "_server_resets", None)
    if done is None:
        done = scheme._server_resets = {}  # optimizer -> (round, recovery epoch) of its reset
    for o in opts:
        if mode == "batch" or done.get(id(o)) != (rnd, ctx.epoch):
            o.state.clear()
            done[id(o)] = (rnd, ctx.epoch)


class SplitScheme(Scheme):
    options = {
        "u_shaped": False,           # labels and last segment stay on the client (section 3)
        "debug_send_labels": False,  # U-shaped only: leak labels anyway (proves the wire test)
        **TRAINING_OPTIONS,
    }
    choices = dict(TRAINING_CHOICES)

    def latency_model(self) -> tuple[str, dict[str, Any]] | None:
        if self.opts["u_shaped"] and self.latency:
            return "ushaped", {}
        return super().latency_model()

    # -- placement ------------------------------------------------------------------------
    def client_segments(self, num_segments: int) -> list[int]:
        if not self.opts["u_shaped"]:
            return [0]
        if num_segments < 3:
            raise ValueError("u_shaped needs two cuts (client: first and last segment, server: "
                             "the middle), e.g. cuts ['conv1', 'fc1']")
        return [0, num_segments - 1]

    def server_segments(self, num_segments: int) -> list[int]:
        own = self.client_segments(num_segments)
        return [s for s in range(num_segments) if s not in own]

    def tier_segments(self, num_segments: int, tiers: list[str]) -> dict[str, list[int]]:
        """Segments per tier of the path client, `tiers`, server: the clients theirs
        (`client_segments`), the relays of tier i the i-th of the rest, the server the others."""
        own = self.client_segments(num_segments)
        middle = [s for s in range(num_segments) if s not in own]
        if len(middle) < len(tiers) + 1:
            raise ValueError(f"{len(tiers)} relay tier(s) {tiers} need at least "
                             f"{len(tiers) + len(own)} cuts{' (u_shaped)' if len(own) > 1 else ''}"
                             f", got {num_segments - 1}")
        out = {"client": own, "server": middle[len(tiers):]}
        out.update({t: [middle[i]] for i, t in enumerate(tiers)})
        return out

    def placement(self, num_segments: int, roles: Roles) -> dict[str, list[int]]:
        return self.chain_placement(num_segments, roles, [])

    def chain_placement(self, num_segments: int, roles: Roles, tiers: list[str],
                        by_tier: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
        """Host -> segments: each host its tier's (`by_tier`, e.g. the controller's; default
        `tier_segments`), plus what the scheme keeps for the clients (`keep_for_clients`)."""
        by_tier = by_tier or self.tier_segments(num_segments, tiers)
        out = {h: list(by_tier.get(t, [])) for t in ("client", *tiers, "server")
               for h in roles[t]}
        return self.keep_for_clients(out, roles, by_tier["client"])

    def keep_for_clients(self, placement: dict[str, list[int]], roles: Roles,
                         client_segs: list[int]) -> dict[str, list[int]]:
        """Add the copies of the client segments other nodes hold (SL's store, SFL's fed
        server). Default: none."""
        return placement

    @staticmethod
    def stored_on_server(placement: dict[str, list[int]], roles: Roles,
                         client_segs: list[int]) -> dict[str, list[int]]:
        """`placement` with the server also holding the client segments (a scheme whose
        server keeps the latest or a global client model: SL's store)."""
        return {**placement, **{s: sorted({*client_segs, *placement[s]})
                                for s in roles["server"]}}

    def client_segs(self, ctx: NodeContext) -> list[int]:
        """The segments a client holds in this run (from the run's placement)."""
        if ctx.placement and ctx.clients:
            return sorted(ctx.placement[ctx.clients[0]])
        return self.client_segments(ctx.num_segments)

    def server_side(self, ctx: NodeContext) -> list[int]:
        """The server-side segments this node holds (a relay's, or the server's own)."""
        own = set(self.client_segs(ctx))
        return [s for s in sorted(ctx.segments) if s not in own]

    # -- scales (1.4) ----------------------------------------------------------------------
    def grad_scale(self, n: int) -> float:
        """Factor from the server objective's cut gradient to what a client gets, when `n`
        clients share one server batch: n gives each client its own mean-loss gradient."""
        return float(n)

    def tail_loss_scale(self, ctx: NodeContext) -> float:
        """Factor on a U-shaped client's own loss, so head and tail see one scale."""
        return 1.0

    # -- client -------------------------------------------------------------------------------
    def client_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        self.train_client(ctx, rnd, iters)

    def train_client(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        (server,) = ctx.servers
        ep = ctx.peers[server]
        for step, (x, y) in enumerate(client_batches(self, ctx, rnd, iters)):
            self.client_step(ctx, ep, rnd, step, x, y)

    def client_step(self, ctx: NodeContext, ep: Endpoint, rnd: int, step: int,
                    x: torch.Tensor, y: torch.Tensor) -> None:
        """One iteration: head forward, ACT, [U: ACT2, tail and loss, GRAD2], GRAD, backward."""
        u = self.opts["u_shaped"]
        with ctx.compute():
            ctx.zero_grad()
            act = ctx.model([0] if u else None)(x)  # a chain may place more on a client
        tensors = {}
        if not u or self.opts["debug_send_labels"]:
            tensors["labels"] = y
        send_cut(ctx, ep, "ACT", rnd, step, act.detach(), tensors)
        if u:
            _, msg = ctx.expect(ep, "ACT2", rnd, step)
            with ctx.compute():
                a2 = msg.tensors["act"].clone().requires_grad_()
                loss = F.cross_entropy(ctx.model([ctx.num_segments - 1])(a2), y)
                (loss * self.tail_loss_scale(ctx)).backward()
            send_cut(ctx, ep, "GRAD2", rnd, step, a2.grad)
            ctx.record_loss(loss.item(), len(y))
        grad = self.recv_cut_grad(ctx, ep, rnd, step, len(y))
        with ctx.compute():
            act.backward(grad)
            ctx.step()

    def recv_cut_grad(self, ctx: NodeContext, ep: Endpoint, rnd: int, step: int,
                      b: int) -> torch.Tensor:
        msg = ctx.expect(ep, "GRAD", rnd, step)[1]
        if "loss" in msg.meta:  # the server's loss of this batch: Power-of-Choice's rpow-d
            ctx.extra["last_loss"] = msg.meta["loss"]
        return msg.tensors["grad"]

    # -- server -------------------------------------------------------------------------------
    def server_model(self, ctx: NodeContext) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
        segs = self.server_side(ctx)
        return ctx.model(segs), [ctx.optimizers[i] for i in segs if i in ctx.optimizers]

    def server_copies(self, ctx: NodeContext) -> ServerCopies:
        """Per-client copies of the server-side segments, built once per node (so each copy's
        optimizer state persists across rounds); a relay's for the clients it serves."""
        if getattr(self, "_copies", None) is None:
            self._copies = ServerCopies(ctx, self.server_side(ctx), served(ctx))
        return self._copies

    # -- relays -------------------------------------------------------------------------------
    def relay_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        """A relay holds server-side segments: it follows the server's round (module doc)."""
        self.server_round(ctx, rnd, iters)

    def update(self, ctx: NodeContext, model: nn.Module, opts: list[torch.optim.Optimizer],
               batch: Batch, rnd: int, step: int, n: int | None = None) -> None:
        """One server update of `batch` with `model`, or on a relay its part of one; `n`: the
        clients of the server's batch this one is part of (default: this batch's)."""
        reset_server_optimizers(self, ctx, opts, rnd)
        if ctx.proxies:
            self.relay_update(ctx, model, opts, batch, rnd, step, n or len(batch))
        else:
            self.server_update(ctx, model, opts, batch, rnd, step)

    def relay_update(self, ctx: NodeContext, model: nn.Module,
                     opts: list[torch.optim.Optimizer], batch: Batch, rnd: int, step: int,
                     n_clients: int) -> None:
        """A relay's part of one server update: each client's activations through `model` and
        on upstream, sent as that client (labels ride along); U-shaped, the server's ACT2 down
        to each client and its GRAD2 back up; then each one's cut gradient (`recv_cut_grad`:
        as a client would get it) back through `model` and on downstream (`send_cut_grad`).
        One optimizer step on dL/dW: upstream gradients carry the scale grad_scale(n_clients),
        the n_clients of the server's batch, undone here."""
        passes = []
        for c, msg in batch:
            with ctx.compute():
                x = msg.tensors["act"].clone().requires_grad_()
                out = model(x)
            send_cut(ctx, ctx.proxies[c], "ACT", rnd, step, out.detach(),
                     {k: v for k, v in msg.tensors.items() if k != "act"}, meta=msg.meta)
            passes.append((c, x, out))
        if self.opts["u_shaped"]:
            for c, _ in batch:
                relay_message(ctx, "ACT2", rnd, c, up=False, step=step)
            for c, _ in batch:
                relay_message(ctx, "GRAD2", rnd, c, up=True, step=step)
        for o in opts:
            o.zero_grad(set_to_none=True)
        for c, x, out in passes:
            grad = self.recv_cut_grad(ctx, ctx.proxies[c], rnd, step, len(x))
            loss = ctx.extra.pop("last_loss", None)  # the server's, for c's client selection
            with ctx.compute():
                out.backward(grad)
            self.send_cut_grad(ctx, c, x.grad, rnd, step, {} if loss is None else {"loss": loss})
        with ctx.compute():
            scale = 1.0 / self.grad_scale(n_clients)
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
            for o in opts:
                o.step()
        ctx.count(relay_steps=1)

    def send_cut_grad(self, ctx: NodeContext, c: str, grad: torch.Tensor, rnd: int,
                      step: int, meta: dict | None = None) -> None:
        """A relay's cut gradient to client `c`, as `recv_cut_grad` expects it."""
        send_grad(ctx, c, "GRAD", grad, rnd, step, meta)

    def server_update(self, ctx: NodeContext, model: nn.Module,
                      opts: list[torch.optim.Optimizer], batch: Batch, rnd: int,
                      step: int) -> None:
        """One forward over the clients' batches concatenated, one backward of the mean of
        their losses, one optimizer step; each client gets its slice of the cut gradient."""
        p = server_forward(self, ctx, model, batch, rnd, step)
        with ctx.compute():
            for o in opts:
                o.zero_grad(set_to_none=True)
            p.out.backward(p.G)
            for o in opts:
                o.step()
        ctx.count(server_steps=1, server_bp_vectors=len(p.out))
        send_cut_grads(ctx, p, (p.x.grad * self.grad_scale(len(batch))).split(p.sizes), rnd,
                       step)


@dataclass
class ServerPass:
    """One server forward over one or several clients' batches, concatenated in `clients`
    order, and G: the gradient of the server objective L = mean_i L_i at the server output."""

    clients: list[str]
    sizes: list[int]
    x: torch.Tensor       # leaf: the concatenated activations
    out: torch.Tensor     # the server segments' output: logits, or A2 when U-shaped
    G: torch.Tensor
    losses: list[float] | None  # per client; None when the clients hold the labels


def server_forward(scheme: SplitScheme, ctx: NodeContext, model: nn.Module, batch: Batch,
                   rnd: int, step: int, *, grad: bool = True) -> ServerPass:
    """Forward, then G from the labels (two-tier) or from the clients' GRAD2 (U-shaped,
    after sending each its ACT2). grad=False: no graph is kept (a later pass makes one)."""
    if ctx.proxies:  # a relay's scheme called server_update rather than update
        raise RuntimeError(f"node {ctx.name} is a relay: its scheme must call update()")
    clients, sizes = [c for c, _ in batch], [len(m.tensors["act"]) for _, m in batch]
    with ctx.compute(), torch.set_grad_enabled(grad):
        x = torch.cat([m.tensors["act"] for _, m in batch]).requires_grad_(grad)
        out = model(x)
    if scheme.opts["u_shaped"]:
        for c, o in zip(clients, out.detach().split(sizes), strict=True):
            send_cut(ctx, ctx.router, "ACT2", rnd, step, o, to=c)
        g2 = [ctx.expect(ctx.router, "GRAD2", rnd, step, peer=c)[1].tensors["grad"]
              for c in clients]
        # Clients send d(tail_loss_scale * L_i)/dA2; undo the cut-gradient scale to get dL/dA2.
        G = torch.cat(g2) / scheme.grad_scale(len(batch))
        return ServerPass(clients, sizes, x, out, G, None)
    with ctx.compute():
        od = out.detach().requires_grad_()
        per = [F.cross_entropy(o, m.tensors["labels"])
               for o, (_, m) in zip(od.split(sizes), batch, strict=True)]
        torch.stack(per).mean().backward()
    losses = [v.item() for v in per]
    ctx.record_loss(sum(losses) / len(losses), sum(sizes))
    return ServerPass(clients, sizes, x, out, od.grad, losses)


def send_cut_grads(ctx: NodeContext, p: ServerPass, rows: Sequence[torch.Tensor], rnd: int,
                   step: int) -> None:
    """GRAD to each client of the pass: its own cut-gradient rows, unicast."""
    for i, (c, g) in enumerate(zip(p.clients, rows, strict=True)):
        send_grad(ctx, c, "GRAD", g, rnd, step, {"loss": p.losses[i]} if p.losses else {})


def send_grad(ctx: NodeContext, c: str, mtype: str, g: torch.Tensor, rnd: int, step: int,
              meta: dict | None = None) -> int:
    """One message of cut-gradient rows to client `c`, counted; returns its bytes."""
    nbytes = send_cut(ctx, ctx.router, mtype, rnd, step, g, to=c, meta=meta)
    ctx.count(grad_rows_down=len(g), grad_bytes_down=nbytes)
    return nbytes


def send_cut(ctx: NodeContext, ep: Endpoint, mtype: str, rnd: int, step: int,
             t: torch.Tensor, tensors: dict | None = None, *, to: str | None = None,
             meta: dict | None = None) -> int:
    """Send what crosses a cut: an activation (ACT, ACT2) or its gradient (GRAD, GRAD2,
    GRAD_BCAST), compressed when the run compresses (ctx.cut, nodes.compression), beside
    `tensors` (labels); returns the message's bytes."""
    name = "act" if mtype.startswith("ACT") else "grad"
    if ctx.cut is None:
        tensors, meta = {**(tensors or {}), name: t.contiguous()}, meta
    elif name == "act":
        tensors, meta = ctx.cut.pack_act(mtype, to or ep.name, rnd, step, t, tensors, meta)
    else:
        tensors, meta = ctx.cut.pack_grad(mtype, to or ep.name, rnd, step, t, meta)
    return ep.send(mtype, to=to, round=rnd, step=step, tensors=tensors, meta=meta)


def relay_message(ctx: NodeContext, mtype: str, rnd: int, c: str, *, up: bool,
                  step: int | None = None) -> None:
    """A relay passes one message of client `c`'s on unchanged: from it upstream (as it), or
    from upstream down to it."""
    if up:
        _, msg = ctx.expect(ctx.router, mtype, rnd, step, peer=c, decode=False)
        ctx.proxies[c].send(mtype, round=rnd, step=msg.step, meta=msg.meta,
                            tensors=msg.tensors)
    else:
        _, msg = ctx.expect(ctx.proxies[c], mtype, rnd, step, decode=False)
        ctx.router.send(mtype, to=c, round=rnd, step=msg.step, meta=msg.meta,
                        tensors=msg.tensors)


# -- serving orders -------------------------------------------------------------------------
def served(ctx: NodeContext) -> list[str]:
    """The clients this node serves: a relay's downstream ones, a server all."""
    return ctx.downstream if ctx.proxies else ctx.clients


def client_order(ctx: NodeContext, rnd: int) -> list[str]:
    """A random order of the clients for round `rnd`, the same on every node (run seed)."""
    g = torch.Generator().manual_seed(ctx.run_seed * 1_000_003 + rnd)
    return [ctx.clients[i] for i in torch.randperm(len(ctx.clients), generator=g).tolist()]


def gather(ctx: NodeContext, rnd: int, step: int, clients: list[str] | None = None) -> Batch:
    """Synchronous barrier: one ACT of `step` from every client (default: those this node
    serves), in that order."""
    clients = served(ctx) if clients is None else clients
    got: dict[str, Message] = {}
    while len(got) < len(clients):
        sender, msg = ctx.expect(ctx.router, "ACT", rnd, step)
        if sender in got or sender not in clients:  # dropped and counted, never fatal
            ctx.router.drop(sender, msg, "a second ACT of this step, or a client not served")
            continue
        got[sender] = msg
    return [(c, got[c]) for c in clients]


def serve_fcfs(ctx: NodeContext, rnd: int, iters: int,
               handle: Callable[[str, Message], None]) -> None:
    """Every served client's `iters` ACTs in arrival order (each client's own in step order)."""
    nxt = dict.fromkeys(served(ctx), 0)
    done = 0
    while done < len(nxt) * iters:
        sender, msg = ctx.expect(ctx.router, "ACT", rnd)
        if nxt.get(sender) != msg.step or msg.step >= iters:  # dropped, counted, not fatal
            ctx.router.drop(sender, msg, f"expected step {nxt.get(sender)} from {sender}")
            continue
        nxt[sender] += 1
        done += 1
        handle(sender, msg)


def serve_in_order(ctx: NodeContext, rnd: int, iters: int, order: list[str],
                   handle: Callable[[str, Message], None]) -> None:
    """One client's whole round after another's (those of `order` this node serves); the
    others' ACTs wait in the context."""
    for c in [c for c in order if c in served(ctx)]:
        for step in range(iters):
            handle(*ctx.expect(ctx.router, "ACT", rnd, step, peer=c))


class ServerCopies:
    """One copy of the server-side segments per client, each with its own optimizer (built
    like the node's), reset from and averaged back into the node's own segments."""

    def __init__(self, ctx: NodeContext, segs: list[int],
                 clients: list[str] | None = None) -> None:
        self.segs = segs
        base = ctx.model(segs)
        like = next((ctx.optimizers[i] for i in segs if i in ctx.optimizers), None)
        self.models = {c: copy.deepcopy(base) for c in (clients or ctx.clients)}
        self.opts = {c: type(like)(m.parameters(), **like.defaults)
                     for c, m in self.models.items()} if like else {}

    def of(self, c: str) -> tuple[nn.Module, list[torch.optim.Optimizer]]:
        """Client `c`'s copy and its optimizer (none for segments without parameters)."""
        return self.models[c], [self.opts[c]] if c in self.opts else []

    def reset(self, ctx: NodeContext) -> None:
        state = ctx.model(self.segs).state_dict()
        for m in self.models.values():
            m.load_state_dict(state)

    def average_into(self, ctx: NodeContext, weights: dict[str, float], *,
                     buffers: bool = True) -> None:
        names = {n for m in self.models.values() for n, _ in m.named_parameters()}
        clients = list(self.models)
        avg = fedavg([{k: v for k, v in self.models[c].state_dict().items()
                       if buffers or k in names} for c in clients],
                     [weights[c] for c in clients])
        ctx.model(self.segs).load_state_dict(avg, strict=buffers)
