"""Parallel split learning (algorithms.md section 5, canonical PSL).

Clients keep their own first segment (never averaged). Per iteration every client sends
ACT(activations, labels); the server concatenates all N batches, runs one forward and one
backward over N*b samples, takes one optimizer step, and returns each client its slice of the
cut-layer gradient, scaled by N so every client sees the per-client mean-loss gradient (1.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nodes.context import NodeContext
from nodes.schemes.base import Scheme


class PSL(Scheme):
    name = "psl"
    options = {"client_grad_scale": "per_client"}  # or "global_mean" (1.4)

    def client_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        (server,) = ctx.servers
        ep = ctx.peers[server]
        model = ctx.model()
        for step, (x, y) in enumerate(ctx.batches(iters)):
            with ctx.compute():
                act = model(x)
            ep.send("ACT", round=rnd, step=step, tensors={"act": act.detach(), "labels": y})
            _, msg = ctx.expect(ep, "GRAD", rnd, step)
            with ctx.compute():
                ctx.zero_grad()
                act.backward(msg.tensors["grad"])
                ctx.step()

    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        model, n = ctx.model(), len(ctx.clients)
        scale = float(n) if self.opts["client_grad_scale"] == "per_client" else 1.0
        for step in range(iters):
            acts = {}
            while len(acts) < n:  # synchronous barrier over all clients
                sender, msg = ctx.expect(ctx.router, "ACT", rnd, step)
                acts[sender] = msg
            order = [c for c in ctx.clients if c in acts]
            with ctx.compute():
                x = torch.cat([acts[c].tensors["act"] for c in order]).requires_grad_()
                ys = [acts[c].tensors["labels"] for c in order]
                out = model(x)
                sizes = [len(y) for y in ys]
                outs = out.split(sizes)
                per_client = [F.cross_entropy(o, y) for o, y in zip(outs, ys, strict=True)]
                loss = torch.stack(per_client).mean()
                ctx.zero_grad()
                loss.backward()
                ctx.step()
                grads = (x.grad * scale).split(sizes)
            for c, g, lc in zip(order, grads, per_client, strict=True):
                ctx.router.send("GRAD", to=c, round=rnd, step=step,
                                tensors={"grad": g.contiguous()}, meta={"loss": lc.item()})
            ctx.record_loss(loss.item(), sum(sizes))
