"""Faults on a timeline: the reactions to a scenario's `kill` and `restart` events.

They only signal a node's process (from the timer thread too: no socket is touched); the run's
fault tolerance (testbed.run.recovery) sees the death and redoes the round from the last
checkpoints, restarting the node. They do not restart anything themselves.
"""

from __future__ import annotations

import signal
from typing import Any


def _signal_node(exp: Any, node: str, sig: str) -> dict[str, Any]:
    p = exp.procs.get(node)
    if p is None:
        raise ValueError(f"no node process on host {node!r}; nodes: {sorted(exp.procs)}")
    p._signal(signal.SIGKILL if sig == "KILL" else signal.SIGTERM)
    return {"node": node, "pid": p.pid, "signal": sig}


def on_kill(exp: Any, ev: Any, ctx: Any) -> dict[str, Any]:
    """A scenario's `kill`: signal the node's process group now (from the timer thread too:
    no socket is touched). The controller sees the exit and redoes the round from the last
    checkpoints, restarting the node (Recovery.recover); with max_restarts=0 the run fails."""
    return _signal_node(exp, ev.node, ev.signal)


def on_restart(exp: Any, ev: Any, ctx: Any) -> dict[str, Any]:
    """A scenario's `restart`: stop the node (SIGTERM) so that recovery restarts it from its
    checkpoint; restarts are automatic, so a `kill` needs no `restart` after it."""
    return _signal_node(exp, ev.node, "TERM")
