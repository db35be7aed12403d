"""The reactions table: which function answers each node-level event kind of a timeline.

Events the engine carries out itself (move, set_link, trace, link_down, link_up) need none;
the others are answered here, explicitly: handover (testbed.scenario.migration), kill and
restart (testbed.scenario.faults), add_client and remove_client (testbed.scenario.membership).
A user's `register(kind, fn)` (testbed.scenario.timeline) adds to or replaces an entry for the
experiments made after it; each experiment holds its own copy (`exp.reactions`).
"""

from __future__ import annotations

from testbed.scenario import faults, membership, migration
from testbed.scenario.timeline import REACTIONS, Reaction

BUILT_IN: dict[str, Reaction] = {
    "handover": migration.on_handover,
    "kill": faults.on_kill,
    "restart": faults.on_restart,
    "add_client": membership.on_add_client,
    "remove_client": membership.on_remove_client,
}


def reactions_for() -> dict[str, Reaction]:
    """A new experiment's reactions: the built-in table, then what users registered."""
    return {**BUILT_IN, **REACTIONS}
