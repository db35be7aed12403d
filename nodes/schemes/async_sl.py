"""Asynchronous split learning (algorithms.md 10): an event-driven server, staleness measured
and handled.

The server consumes ACTs first come first served with no barrier and takes one optimizer step
per client batch (as SFL-V2 fcfs / PSL per_client_sequential), but nobody waits for a slow
client: a round is a budget of server updates (iters x the clients served, what a synchronous
round would do), and clients keep sending batches until the server answers one with `stop`.
So a fast client contributes more updates and a straggler fewer; the round ends one straggler
forward pass after the budget is spent, not after the straggler's last batch.

Versions: the server's model version v_s counts its steps (kept across rounds). Every GRAD
carries the version after the step; every ACT carries v_seen, the version the client last got
gradients from. Staleness tau = v_s(now) - v_seen: how many server steps happened since this
client's last interaction. Policies (option staleness_policy):
- none: apply every update as usual;
- bounded: tau > tau_max drops the batch: the reply carries `dropped` and no gradient, the
  client discards it and resyncs its v_seen;
- lr_decay: the server's step size is lr * s(tau).
s(tau) (option staleness_fn): constant 1; polynomial (1 + tau)^-a; hinge 1 if tau <= b else
1 / (a (tau - b) + 1). fedasync_mix (client-model mixing) is not implemented: clients keep their
own first segment, never averaged, as in PSL.

Reported per round by the server (ctx.extra): staleness (tau of every batch, in order),
staleness_hist, updates_per_client, dropped; by clients: counters client_steps and
client_dropped. Clients stay on one scheme path with compression (nodes.compression): ACT and
GRAD go through send_cut / expect like every split scheme's.
"""

from __future__ import annotations

from collections import Counter

import torch

from nodes.context import NodeContext
from nodes.schemes.common import SplitScheme, send_cut, send_grad, served, server_forward

MAX_BATCHES = 10**9  # a client's batches per round: until the server says stop


def staleness_weight(tau: int, fn: str, a: float, b: float) -> float:
    """s(tau) of algorithms.md 10 (FedAsync's constant, polynomial and hinge)."""
    if fn == "constant":
        return 1.0
    if fn == "polynomial":
        return (1.0 + tau) ** (-a)
    return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)


class AsyncSL(SplitScheme):
    name = "async_sl"
    options = {**SplitScheme.options, "staleness_policy": "none", "tau_max": 4,
               "staleness_fn": "polynomial", "staleness_a": 0.5, "staleness_b": 4.0}
    choices = {"staleness_policy": ("none", "bounded", "lr_decay"),
               "staleness_fn": ("constant", "polynomial", "hinge")}

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        if self.opts["u_shaped"]:
            raise ValueError("scheme 'async_sl': option u_shaped is not supported")
        self.version = 0   # server: its model version; client: v_seen

    def chain_placement(self, num_segments, roles, tiers, by_tier=None):
        if tiers:
            raise ValueError(f"scheme 'async_sl' does not run over a chain of relays "
                             f"(tiers {tiers})")
        return super().chain_placement(num_segments, roles, tiers, by_tier)

    # -- client -------------------------------------------------------------------------------
    def client_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        (server,) = ctx.servers
        ep = ctx.peers[server]
        for step, (x, y) in enumerate(ctx.batches(MAX_BATCHES)):
            with ctx.compute():
                ctx.zero_grad()
                act = ctx.model()(x)
            send_cut(ctx, ep, "ACT", rnd, step, act.detach(), {"labels": y},
                     meta={"v_seen": self.version})
            _, msg = ctx.expect(ep, "GRAD", rnd, step)
            if msg.meta.get("stop"):
                break
            self.version = int(msg.meta["version"])
            if msg.meta.get("dropped"):
                ctx.count(client_dropped=1)
                continue
            ctx.extra["last_loss"] = msg.meta.get("loss")
            with ctx.compute():
                act.backward(msg.tensors["grad"])
                ctx.step()
            ctx.count(client_steps=1)

    # -- server -------------------------------------------------------------------------------
    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        model, opts = self.server_model(ctx)
        active = set(served(ctx))
        budget, done = iters * len(active), 0
        taus: list[int] = []
        per_client: Counter[str] = Counter()
        dropped = 0
        o = self.opts
        while active:
            c, msg = ctx.expect(ctx.router, "ACT", rnd)
            if done >= budget:  # the round's updates are spent: this client stops
                ctx.router.send("GRAD", to=c, round=rnd, step=msg.step, meta={"stop": True})
                active.discard(c)
                continue
            tau = self.version - int(msg.meta.get("v_seen", 0))
            taus.append(tau)
            if o["staleness_policy"] == "bounded" and tau > o["tau_max"]:
                ctx.router.send("GRAD", to=c, round=rnd, step=msg.step,
                                meta={"dropped": True, "version": self.version})
                dropped += 1
                continue
            scale = 1.0
            if o["staleness_policy"] == "lr_decay":
                scale = staleness_weight(tau, o["staleness_fn"], o["staleness_a"],
                                         o["staleness_b"])
            p = server_forward(self, ctx, model, [(c, msg)], rnd, msg.step)
            with ctx.compute():
                for opt in opts:
                    opt.zero_grad(set_to_none=True)
                p.out.backward(p.G)
                step_with_scale(opts, scale)
            self.version += 1
            done += 1
            per_client[c] += 1
            ctx.count(server_steps=1, server_bp_vectors=len(p.out))
            send_grad(ctx, c, "GRAD", p.x.grad, rnd, msg.step,
                      {"loss": p.losses[0], "version": self.version})
        ctx.extra.update(staleness=taus, staleness_hist=dict(Counter(map(str, taus))),
                         updates_per_client=dict(per_client), dropped=dropped)


def step_with_scale(opts: list[torch.optim.Optimizer], scale: float) -> None:
    """One step of each optimizer at `scale` times its learning rate."""
    for opt in opts:
        saved = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = g["lr"] * scale
        opt.step()
        for g, lr in zip(opt.param_groups, saved, strict=True):
            g["lr"] = lr
