"""SplitFed V2 (algorithms.md 4.2): SFL-V1's clients and fed server, one sequential W_s.

The main server keeps one server-side model and takes one optimizer step per client batch,
with no server-side averaging; the client side is averaged per round by the fed server exactly
as in V1. Option v2_order [D]: fcfs (batches in arrival order, what a deployment would do;
the default) or random_per_round (a random client order per round, each client's whole
round before the next's, as in the reference code). In a chain a relay keeps one shared copy of
its segments and serves in the same order, as the main server does (docs/multitier.md).
"""

from __future__ import annotations

from nodes.context import NodeContext
from nodes.protocol import Message
from nodes.schemes.common import client_order, serve_fcfs, serve_in_order
from nodes.schemes.sflv1 import SFLV1


class SFLV2(SFLV1):
    name = "sflv2"
    label = "SFL-V2"
    latency = "sflv2"
    options = {**SFLV1.options, "v2_order": "fcfs"}
    choices = {**SFLV1.choices, "v2_order": ("fcfs", "random_per_round")}

    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        model, opts = self.server_model(ctx)

        def handle(c: str, msg: Message) -> None:
            self.update(ctx, model, opts, [(c, msg)], rnd, msg.step)

        if self.opts["v2_order"] == "fcfs":
            serve_fcfs(ctx, rnd, iters, handle)
        else:
            serve_in_order(ctx, rnd, iters, client_order(ctx, rnd), handle)
