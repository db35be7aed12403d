"""Clients leaving and joining a run: the reactions to the scenario events `remove_client` and
`add_client` (testbed.scenario.timeline).

Membership is the controller's: `exp.pool.absent` holds the clients that are out
(testbed.run.pool says how a round's participants follow from it). A client that leaves
keeps its process, its
segment and its data shard, idle; when it joins again it trains on from where it left. A
change takes effect at the next round boundary: a round's participants are fixed when it
starts, so no step is half done.
"""

from __future__ import annotations

from typing import Any


def _client(exp: Any, node: str, kind: str) -> str:
    clients = exp.roles["client"]
    if node not in clients:
        raise ValueError(f"{kind}: {node!r} is not a client of this run (clients {clients})")
    return node


def on_remove_client(exp: Any, ev: Any, ctx: Any) -> dict[str, Any]:
    node = _client(exp, ev.node, "remove_client")

    def leave(exp: Any) -> None:
        if not set(exp.roles["client"]) - exp.pool.absent - {node}:
            raise ValueError(f"remove_client {node}: it is the last client taking part")
        exp.pool.absent.add(node)

    ctx.later(leave)
    return {"node": node, "from_round": "next"}


def on_add_client(exp: Any, ev: Any, ctx: Any) -> dict[str, Any]:
    node = _client(exp, ev.node, "add_client")
    ctx.later(lambda exp: exp.pool.absent.discard(node))
    return {"node": node, "from_round": "next"}
