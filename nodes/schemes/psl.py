"""Parallel split learning (algorithms.md section 5, canonical PSL).

Clients keep their own first segment (never averaged). Per iteration every client sends
ACT(activations, labels); the server concatenates all N batches, runs one forward and one
backward over N*b samples, takes one optimizer step, and returns each client its slice of the
cut-layer gradient, scaled by N so every client sees the per-client mean-loss gradient (1.4).

Options ([D] in the spec): client_grad_scale (per_client | global_mean, 1.4) and
psl_server_mode: concat (the above), per_client_sequential (one server step per client batch,
first come first served: SFL-V2 without the fed server), per_client_copies_avg (a server copy
per client, averaged every iteration: CycleSL's PSL). u_shaped keeps labels on the clients.
In a chain (docs/multitier.md) a relay runs this round over the clients it serves, on its own
segments: in concat mode it gathers their ACTs of each step, relays them and steps once.
"""

from __future__ import annotations

from nodes.context import NodeContext
from nodes.schemes.common import SplitScheme, gather, serve_fcfs


class PSL(SplitScheme):
    name = "psl"
    label = "PSL"
    latency = "psl_epsl"
    options = {**SplitScheme.options, "client_grad_scale": "per_client",
               "psl_server_mode": "concat"}
    choices = {**SplitScheme.choices, "client_grad_scale": ("per_client", "global_mean"),
               "psl_server_mode": ("concat", "per_client_sequential", "per_client_copies_avg")}

    def concatenates(self) -> bool:
        """Whether all clients' batches form one server batch."""
        return self.opts["psl_server_mode"] == "concat"

    def grad_scale(self, n: int) -> float:
        return float(n) if self.opts["client_grad_scale"] == "per_client" else 1.0

    def tail_loss_scale(self, ctx: NodeContext) -> float:
        n = len(ctx.clients) if self.concatenates() else 1
        return self.grad_scale(n) / n

    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        model, opts = self.server_model(ctx)
        if self.concatenates():  # one server batch of all the clients' (n on a relay too)
            for step in range(iters):
                self.update(ctx, model, opts, gather(ctx, rnd, step), rnd, step,
                            n=len(ctx.clients))
        elif self.opts["psl_server_mode"] == "per_client_sequential":
            serve_fcfs(ctx, rnd, iters, lambda c, m: self.update(
                ctx, model, opts, [(c, m)], rnd, m.step))
        else:
            copies = self.server_copies(ctx)
            for step in range(iters):
                copies.reset(ctx)
                for c, m in gather(ctx, rnd, step):
                    self.update(ctx, *copies.of(c), [(c, m)], rnd, step)
                copies.average_into(ctx, dict.fromkeys(copies.models, 1.0))
