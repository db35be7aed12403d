"""Vanilla (sequential) split learning (algorithms.md section 2).

One client model W_c moves from client to client; one server model W_s serves them all. Each
round every node draws the same random client order (seeded by the run seed and the round).
In turn, a client receives the latest W_c (W_DOWN), trains its local iterations against the
server (one server step per batch), and passes W_c on: to the server, which keeps it and hands
it to the next client (handoff=server, the default [D]), or straight to the next client
(handoff=p2p; clients then connect to each other). Only one client is active at a time.

Options ([D]): handoff (server | p2p); handoff_optimizer_state (false: each turn starts with a
fresh optimizer, as the reference code does; true: the optimizer state travels with W_c);
reset_server_optimizer_each_batch (the reference code's quirk, off by default); u_shaped
(the hand-off then carries head and tail). Each client reports the digest of the W_c it
started from and ended with, so the hand-off chain can be checked (oracle 14.6).

In a chain (docs/multitier.md) the relays' segments are server-side, one shared copy each,
served in the same client order; with handoff=server the server still stores W_c, and the
relays pass W_DOWN and W_UP on unchanged (p2p hand-offs go from client to client directly).
"""

from __future__ import annotations

import torch

from nodes.context import NodeContext
from nodes.protocol import Message
from nodes.schemes.base import Roles
from nodes.schemes.common import SplitScheme, client_order, relay_message, serve_in_order, served
from nodes.schemes.weights import fingerprint, pack, reset_optimizers, unpack


class VanillaSL(SplitScheme):
    name = "sl"
    label = "SL"
    latency = "vanilla_sl"
    options = {**SplitScheme.options, "handoff": "server", "handoff_optimizer_state": False,
               "reset_server_optimizer_each_batch": False}
    choices = {**SplitScheme.choices, "handoff": ("server", "p2p")}
    sequential_clients = True

    def via_server(self) -> bool:
        return self.opts["handoff"] == "server"

    def keep_for_clients(self, placement: dict[str, list[int]], roles: Roles,
                         client_segs: list[int]) -> dict[str, list[int]]:
        if self.via_server():  # the server also keeps the latest W_c between turns
            return self.stored_on_server(placement, roles, client_segs)
        return placement

    def connections(self, roles: Roles) -> list[tuple[str, str]]:
        links = super().connections(roles)
        if not self.via_server():
            links += [(a, b) for a in roles["client"] for b in roles["client"] if a != b]
        return links

    def model_of(self, client: str, placement: dict[str, list[int]],
                 num_segments: int) -> list[tuple[str, int]]:
        # The latest W_c with W_s (2, step 3): with handoff=server the server's copy (the
        # store: the last node holding segment 0); with p2p each client's own, which is the
        # latest only for the round's last client. Relays' segments from the relays.
        parts = super().model_of(client, placement, num_segments)
        if self.via_server():
            store = [n for n, segs in placement.items() if 0 in segs][-1]
            parts = [(store, s) if n == client else (n, s) for n, s in parts]
        return parts

    def _pack(self, ctx: NodeContext) -> dict[str, torch.Tensor]:
        return pack(ctx, self.client_segs(ctx), optimizer=self.opts["handoff_optimizer_state"])

    # -- client -------------------------------------------------------------------------------
    def client_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        order, segs = client_order(ctx, rnd), self.client_segs(ctx)
        k, (server,) = order.index(ctx.name), ctx.servers
        holder = client_order(ctx, rnd - 1)[-1] if rnd > 1 else None  # last round's last client
        if not self.via_server() and holder == ctx.name and k > 0:
            ctx.peers[order[0]].send("W_DOWN", round=rnd, tensors=self._pack(ctx))
        source = server if self.via_server() else order[k - 1] if k > 0 else holder
        handed = source not in (None, ctx.name)
        if handed or not self.opts["handoff_optimizer_state"]:
            reset_optimizers(ctx, segs)  # a fresh optimizer, or one about to get handed state
        if handed:
            ep = ctx.peers[server] if self.via_server() else ctx.router
            _, msg = ctx.expect(ep, "W_DOWN", rnd, peer=None if self.via_server() else source)
            with ctx.compute():
                unpack(ctx, msg.tensors, segs)
        start = fingerprint(ctx, segs)
        self.train_client(ctx, rnd, iters)
        if self.via_server():
            ctx.peers[server].send("W_UP", round=rnd, tensors=self._pack(ctx))
        elif k + 1 < len(order):
            ctx.peers[order[k + 1]].send("W_DOWN", round=rnd, tensors=self._pack(ctx))
        ctx.extra["handoff"] = {"position": k, "start": start, "end": fingerprint(ctx, segs)}

    # -- server -------------------------------------------------------------------------------
    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        """The server's round, and a relay's (SplitScheme.relay_round)."""
        model, opts = self.server_model(ctx)
        relay = bool(ctx.proxies)

        def handle(c: str, msg: Message) -> None:
            if self.opts["reset_server_optimizer_each_batch"]:
                for o in opts:
                    o.state.clear()
            self.update(ctx, model, opts, [(c, msg)], rnd, msg.step)

        for c in [c for c in client_order(ctx, rnd) if c in served(ctx)]:
            if relay and self.via_server():
                relay_message(ctx, "W_DOWN", rnd, c, up=False)
            elif self.via_server():
                ctx.router.send("W_DOWN", to=c, round=rnd, tensors=self._pack(ctx))
            serve_in_order(ctx, rnd, iters, [c], handle)
            if relay and self.via_server():
                relay_message(ctx, "W_UP", rnd, c, up=True)
            elif self.via_server():
                _, msg = ctx.expect(ctx.router, "W_UP", rnd, peer=c)
                unpack(ctx, msg.tensors, self.client_segs(ctx))
