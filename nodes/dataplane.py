"""A node's data-plane connections: who listens where, and the HELLO exchange that opens them.

Shared by the runtime (start-up), fault recovery (rejoin after a restart: nodes.fault) and
migration (repoint to a new server: nodes.migrate), so none of them imports another. It only
opens connections; what flows over them is the scheme's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodes.context import NodeContext


def server_at(config: dict[str, Any], addr: str) -> str:
    """The node listening at `addr` (its public key is the one to expect there)."""
    for name, where in config.get("listeners", {}).items():
        if where == addr:
            return name
    raise ValueError(f"node config: no listener at {addr} in 'listeners'")


def open_data_plane(ctx: NodeContext, accept: list[str], timeout_s: float,
                    hello: list[str] | None = None) -> None:
    """HELLO to every upstream peer (or those named in `hello`: peers or proxied clients);
    wait for HELLO from every peer in `accept`.

    A ROUTER can address a peer only once it has heard from it; after this exchange a server
    may send first (e.g. weights to a client) without the scheme knowing about identities.
    """
    deadline = time.monotonic() + timeout_s
    for peer, ep in [*ctx.peers.items(), *ctx.proxies.items()]:
        if hello is not None and peer not in hello:
            continue
        while True:
            try:
                ep.send("HELLO")
                break
            except TimeoutError:  # peer not listening yet; libzmq keeps reconnecting
                if time.monotonic() > deadline:
                    raise TimeoutError(f"node {ctx.name}: peer {peer} unreachable for "
                                       f"{timeout_s:.0f}s") from None
    waiting = set(accept)
    while waiting:
        left = deadline - time.monotonic()
        try:
            sender, msg = ctx.router.recv(max(left, 0.0))
        except TimeoutError:
            raise TimeoutError(f"node {ctx.name}: no HELLO from {sorted(waiting)} within "
                               f"{timeout_s:.0f}s") from None
        if msg.type != "HELLO" or sender not in waiting:
            raise RuntimeError(f"node {ctx.name}: expected HELLO from {sorted(waiting)}, got "
                               f"{msg.type} from {sender}")
        waiting.discard(sender)
