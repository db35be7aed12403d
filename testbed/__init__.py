"""sledge's controller side: networks, plans, runs, scenarios, reports and the CLI.

The public names are importable from here (``from testbed import Experiment, RunConfig``);
they load on first use, so ``import testbed`` stays cheap and needs neither torch nor Mininet.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Experiment", "RunConfig", "RunFailed", "load_topology"]
_WHERE = {"Experiment": "testbed.experiment", "RunFailed": "testbed.experiment",
          "RunConfig": "testbed.config", "load_topology": "testbed.cli"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'testbed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
