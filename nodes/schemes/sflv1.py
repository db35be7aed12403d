"""SplitFed V1 (algorithms.md 4.1): parallel clients, a server-side copy per client, and two
FedAvgs per round.

Roles: clients, a main server (the server-side computation) and a fed server (FedAvg of the
client-side models), the fed server a node of its own on its own host so that its traffic is
attributable. Per round every client trains its local iterations against its own copy of W_s
on the main server (all clients in parallel, served first come first served); then the main
server averages the copies into W_s, and every client uploads W_c to the fed server (W_UP),
which averages them and sends the average back (W_DOWN): every client ends the round with
the same W_c. Options ([D]): fedavg_weights (data | uniform), average_bn_stats, u_shaped.
In a chain the relays' segments are server-side: a relay keeps a copy per client it serves and
averages them each round, as the main server does with its own (docs/multitier.md).
"""

from __future__ import annotations

from nodes.context import NodeContext
from nodes.schemes.base import Roles
from nodes.schemes.common import SplitScheme, serve_fcfs
from nodes.schemes.weights import (
    FEDAVG_CHOICES,
    FEDAVG_OPTIONS,
    aggregate_and_broadcast,
    client_weights,
    upload_and_adopt,
)


class SFLV1(SplitScheme):
    name = "sflv1"
    label = "SFL-V1"
    latency = "sflv1"
    roles = ("client", "server", "fedserver")
    options = {**SplitScheme.options, **FEDAVG_OPTIONS}
    choices = {**SplitScheme.choices, **FEDAVG_CHOICES}

    def keep_for_clients(self, placement: dict[str, list[int]], roles: Roles,
                         client_segs: list[int]) -> dict[str, list[int]]:
        return {**placement, **{f: list(client_segs) for f in roles["fedserver"]}}

    def connections(self, roles: Roles) -> list[tuple[str, str]]:
        return super().connections(roles) + [
            (c, f) for c in roles["client"] for f in roles["fedserver"]]

    def client_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        self.train_client(ctx, rnd, iters)
        (fed,) = ctx.roles["fedserver"]
        upload_and_adopt(ctx, ctx.peers[fed], rnd, self.client_segs(ctx),
                         buffers=self.opts["average_bn_stats"])

    def fedserver_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        aggregate_and_broadcast(ctx, rnd, self.client_segs(ctx),
                                buffers=self.opts["average_bn_stats"],
                                weighting=self.opts["fedavg_weights"])

    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        copies = self.server_copies(ctx)
        copies.reset(ctx)  # every copy starts the round from the last average
        serve_fcfs(ctx, rnd, iters, lambda c, m: self.update(
            ctx, *copies.of(c), [(c, m)], rnd, m.step))
        copies.average_into(ctx, client_weights(ctx, self.opts["fedavg_weights"]),
                            buffers=self.opts["average_bn_stats"])
        ctx.count(aggregations=1)
