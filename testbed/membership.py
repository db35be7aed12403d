"""Clients leaving and joining a run: the reactions to the scenario events `remove_client` and
`add_client` (testbed.scenario).

Membership is the controller's: `exp.absent` holds the clients that are out. Each round's
participants are the clients not absent (and, with client selection, chosen: nodes.selection),
sent in the round command as `clients`; every node narrows its client list to them, so a
server's barrier and averaging cover members only. A client that leaves keeps its process, its
segment and its data shard, idle; when it joins again it trains on from where it left. A
change takes effect at the next round boundary: a round's participants are fixed when it
starts, so no step is half done.
"""

from __future__ import annotations

from typing import Any

from testbed.scenario import register


def _client(exp: Any, node: str, kind: str) -> str:
    clients = exp.roles["client"]
    if node not in clients:
        raise ValueError(f"{kind}: {node!r} is not a client of this run (clients {clients})")
    return node


@register("remove_client")
def on_remove_client(exp: Any, ev: Any, ctx: Any) -> dict[str, Any]:
    node = _client(exp, ev.node, "remove_client")

    def leave(exp: Any) -> None:
        if not set(exp.roles["client"]) - exp.absent - {node}:
            raise ValueError(f"remove_client {node}: it is the last client taking part")
        exp.absent.add(node)

    ctx.later(leave)
    return {"node": node, "from_round": "next"}


@register("add_client")
def on_add_client(exp: Any, ev: Any, ctx: Any) -> dict[str, Any]:
    node = _client(exp, ev.node, "add_client")
    ctx.later(lambda exp: exp.absent.discard(node))
    return {"node": node, "from_round": "next"}


def participants(exp: Any, chosen: list[str] | None) -> list[str] | None:
    """The round's clients (None: all of them, the nodes' default)."""
    if chosen is None and not exp.absent:
        return None
    return [c for c in (chosen if chosen is not None else exp.roles["client"])
            if c not in exp.absent]
