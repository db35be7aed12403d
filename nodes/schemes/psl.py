"""Parallel split learning (algorithms.md section 5, canonical PSL).

Clients keep their own first segment (never averaged). Per iteration every client sends
ACT(activations, labels); the server concatenates all N batches, runs one forward and one
backward over N*b samples, takes one optimizer step, and returns each client its slice of the
cut-layer gradient, scaled by N so every client sees the per-client mean-loss gradient (1.4).

Options ([D] in the spec): client_grad_scale (per_client | global_mean, 1.4) and
psl_server_mode: concat (the above), per_client_sequential (one server step per client batch,
first come first served: SFL-V2 without the fed server), per_client_copies_avg (a server copy
per client, averaged every iteration: CycleSL's PSL). u_shaped keeps labels on the clients.
In a chain (concat only), a relay tier gathers its clients' ACTs of each step and relays them.
"""

from __future__ import annotations

from nodes.context import NodeContext
from nodes.schemes.base import Roles
from nodes.schemes.common import SplitScheme, gather, serve_fcfs


class PSL(SplitScheme):
    name = "psl"
    options = {**SplitScheme.options, "client_grad_scale": "per_client",
               "psl_server_mode": "concat"}
    choices = {"client_grad_scale": ("per_client", "global_mean"),
               "psl_server_mode": ("concat", "per_client_sequential", "per_client_copies_avg")}

    def concatenates(self) -> bool:
        """Whether all clients' batches form one server batch."""
        return self.opts["psl_server_mode"] == "concat"

    def grad_scale(self, n: int) -> float:
        return float(n) if self.opts["client_grad_scale"] == "per_client" else 1.0

    def tail_loss_scale(self, ctx: NodeContext) -> float:
        n = len(ctx.clients) if self.concatenates() else 1
        return self.grad_scale(n) / n

    def chain_placement(self, num_segments: int, roles: Roles,
                        tiers: list[str]) -> dict[str, list[int]]:
        if not self.concatenates():
            raise ValueError("a chain of relays needs psl_server_mode=concat")
        return super().chain_placement(num_segments, roles, tiers)

    def relay_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        for step in range(iters):
            self.relay_update(ctx, gather(ctx, rnd, step, ctx.downstream), rnd, step,
                              len(ctx.clients))

    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        model, opts = self.server_model(ctx)
        if self.concatenates():
            for step in range(iters):
                self.server_update(ctx, model, opts, gather(ctx, rnd, step), rnd, step)
        elif self.opts["psl_server_mode"] == "per_client_sequential":
            serve_fcfs(ctx, rnd, iters, lambda c, m: self.server_update(
                ctx, model, opts, [(c, m)], rnd, m.step))
        else:
            copies = self.server_copies(ctx)
            for step in range(iters):
                copies.reset(ctx)
                for c, m in gather(ctx, rnd, step):
                    self.server_update(ctx, copies.models[c], [copies.opts[c]], [(c, m)],
                                       rnd, step)
                copies.average_into(ctx, dict.fromkeys(ctx.clients, 1.0))
