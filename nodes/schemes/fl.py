"""Federated averaging, FedAvg (the baseline without a split): no cut crosses the network.

Every client holds the whole model and trains its local iterations on its own; then it uploads
its weights (W_UP) to the server, which averages them and sends the average back (W_DOWN), so
every client ends the round with the same model. The server holds the global model between
rounds. Options: fedavg_weights (data | uniform) and average_bn_stats, as in SFL;
client_optimizer_reset and epoch_rounds as the split schemes' (common.py). With equal weights
and persistent optimizers FL trains bit for bit as SFL-V1 does (docs/schemes.md).
"""

from __future__ import annotations

import torch.nn.functional as F

from nodes.context import NodeContext
from nodes.schemes.base import Roles, Scheme
from nodes.schemes.common import RESETS, client_batches
from nodes.schemes.weights import (
    FEDAVG_CHOICES,
    FEDAVG_OPTIONS,
    aggregate_and_broadcast,
    upload_and_adopt,
)


class FedAvg(Scheme):
    name = "fl"
    label = "FL"
    options = {**FEDAVG_OPTIONS, "client_optimizer_reset": "never", "epoch_rounds": False}
    choices = {**FEDAVG_CHOICES, "client_optimizer_reset": RESETS}

    def placement(self, num_segments: int, roles: Roles) -> dict[str, list[int]]:
        whole = list(range(num_segments))
        return {n: whole for n in roles["client"] + roles["server"]}

    def client_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        model = ctx.model()
        for x, y in client_batches(self, ctx, rnd, iters):
            with ctx.compute():
                ctx.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                ctx.step()
            ctx.record_loss(loss.item(), len(y))
        (server,) = ctx.servers
        upload_and_adopt(ctx, ctx.peers[server], rnd, sorted(ctx.segments),
                         buffers=self.opts["average_bn_stats"])

    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        aggregate_and_broadcast(ctx, rnd, sorted(ctx.segments),
                                buffers=self.opts["average_bn_stats"],
                                weighting=self.opts["fedavg_weights"])
