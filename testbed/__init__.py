"""sledge's controller side: networks, plans, runs, scenarios, reports and the CLI.

Six packages, each importing only those below it (tests/test_layers.py checks):

    cli       the `sledge` command: argparse, nothing imports it
    report    comparisons, analysis and plots, read back from run folders
    scenario  timelines (events, engine, reactions), handover and migration; testbed.Experiment
    run       one run: control channel, launchers, recovery, records, evaluation
    plan      pure data: config, who does what where, chains, latency model, mobility, resources
    emu       the emulated network: links, relays, Mininet, routing, topology loading

`testbed.errors` sits below them all. nodes/ (the node processes) never imports testbed.

The public names are importable from here (``from testbed import Experiment, RunConfig``);
they load on first use, so ``import testbed`` stays cheap and needs neither torch nor Mininet.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Experiment", "RunConfig", "RunFailed", "load_topology"]
_WHERE = {"Experiment": "testbed.scenario.experiment", "RunFailed": "testbed.errors",
          "RunConfig": "testbed.plan.config", "load_topology": "testbed.emu.topology"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'testbed' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_WHERE[name]), name)
