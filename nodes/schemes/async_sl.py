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
1 / (a (tau - b) + 1).

Client models (option client_mix): none (each client keeps its own first segment, as in PSL)
or fedasync_mix (FedAsync): the server keeps a global W_c with its own version; when a client
stops for the round it sends W_UP with the version it started from, the server mixes
W_c <- (1 - alpha_t) W_c + alpha_t W_c,i with alpha_t = mix_alpha * s(tau_c), tau_c = global
version - that version, and answers W_DOWN with the mixed model, which the client adopts.

Reported per round by the server (ctx.extra): staleness (tau of every batch, in order),
staleness_hist, updates_per_client, dropped, client_staleness (tau_c of every mix); by
clients: counters client_steps and client_dropped. Compression (nodes.compression) applies as
in every split scheme: ACT and GRAD go through send_cut and expect.
"""

from __future__ import annotations

from collections import Counter

import torch

from nodes.context import NodeContext
from nodes.schemes.base import Roles
from nodes.schemes.common import (
    TRAINING_OPTIONS,
    SplitScheme,
    send_cut,
    send_grad,
    served,
    server_forward,
)
from nodes.schemes.weights import fedavg, pack, unpack

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
    label = "Async SL"
    # its clients stream batches until told to stop: no rounds of fixed steps to reset at
    options = {**{k: v for k, v in SplitScheme.options.items() if k not in TRAINING_OPTIONS},
               "staleness_policy": "none", "tau_max": 4, "staleness_fn": "polynomial",
               "staleness_a": 0.5, "staleness_b": 4.0,
               "client_mix": "none", "mix_alpha": 0.5}
    choices = {"staleness_policy": ("none", "bounded", "lr_decay"),
               "staleness_fn": ("constant", "polynomial", "hinge"),
               "client_mix": ("none", "fedasync_mix")}

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        if self.opts["u_shaped"]:
            raise ValueError("scheme 'async_sl': option u_shaped is not supported")
        self.version = 0   # server: its model version; client: v_seen
        self.cversion = 0  # fedasync_mix: the global client model's version (server: current)

    def mixing(self) -> bool:
        return self.opts["client_mix"] == "fedasync_mix"

    def keep_for_clients(self, placement: dict[str, list[int]], roles: Roles,
                         client_segs: list[int]) -> dict[str, list[int]]:
        if self.mixing():  # the server holds the global W_c it mixes into
            for s in roles["server"]:
                placement[s] = sorted({*client_segs, *placement[s]})
        return placement

    def weight(self, tau: int) -> float:
        o = self.opts
        return staleness_weight(tau, o["staleness_fn"], o["staleness_a"], o["staleness_b"])

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
                if self.mixing():
                    segs = self.client_segs(ctx)
                    ep.send("W_UP", round=rnd, tensors=pack(ctx, segs),
                            meta={"v_start": self.cversion})
                    _, down = ctx.expect(ep, "W_DOWN", rnd)
                    with ctx.compute():
                        unpack(ctx, down.tensors, segs)
                    self.cversion = int(down.meta["version"])
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
        ctaus: list[int] = []
        per_client: Counter[str] = Counter()
        dropped = 0
        o = self.opts
        while active:
            c, msg = ctx.expect(ctx.router, "ACT", rnd)
            if done >= budget:  # the round's updates are spent: this client stops
                ctx.router.send("GRAD", to=c, round=rnd, step=msg.step, meta={"stop": True})
                active.discard(c)
                if self.mixing():
                    ctaus.append(self.mix(ctx, rnd, c))
                continue
            tau = self.version - int(msg.meta.get("v_seen", 0))
            taus.append(tau)
            if o["staleness_policy"] == "bounded" and tau > o["tau_max"]:
                ctx.router.send("GRAD", to=c, round=rnd, step=msg.step,
                                meta={"dropped": True, "version": self.version})
                dropped += 1
                continue
            scale = self.weight(tau) if o["staleness_policy"] == "lr_decay" else 1.0
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
        if self.mixing():
            ctx.extra["client_staleness"] = ctaus

    def mix(self, ctx: NodeContext, rnd: int, c: str) -> int:
        """FedAsync: client `c`'s W_UP into the global W_c at alpha * s(tau_c); W_DOWN back.
        Returns tau_c."""
        segs = self.client_segs(ctx)
        _, up = ctx.expect(ctx.router, "W_UP", rnd, peer=c)
        tau_c = self.cversion - int(up.meta.get("v_start", 0))
        alpha = self.opts["mix_alpha"] * self.weight(tau_c)
        with ctx.compute():
            unpack(ctx, fedavg([pack(ctx, segs), up.tensors], [1.0 - alpha, alpha]), segs)
        self.cversion += 1
        ctx.router.send("W_DOWN", to=c, round=rnd, tensors=pack(ctx, segs),
                        meta={"version": self.cversion, "alpha": alpha})
        ctx.count(aggregations=1)
        return tau_c


def step_with_scale(opts: list[torch.optim.Optimizer], scale: float) -> None:
    """One step of each optimizer at `scale` times its learning rate."""
    for opt in opts:
        saved = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = g["lr"] * scale
        opt.step()
        for g, lr in zip(opt.param_groups, saved, strict=True):
            g["lr"] = lr
