"""scenario: what happens while a run trains: timelines of link changes, moves, faults and
membership, and the reactions to them.

The timeline's schema and loader (timeline), its engine (engine), the reactions table
(reactions: handover -> migration, kill/restart -> faults, add/remove_client -> membership),
and `Experiment` (experiment), testbed.run's Experiment with the engine as a hook, which is
what testbed.Experiment is. It changes the network through testbed.emu.linkops and drives
nodes through the run's control channel; it does not write reports.
"""

from testbed.scenario.timeline import (
    KINDS,
    EventContext,
    Scenario,
    ScenarioError,
    register,
)

__all__ = ["KINDS", "EventContext", "Scenario", "ScenarioError", "register"]
