"""`sledge scenario`: check a timeline and show the link states it would apply (no network)."""

from __future__ import annotations

from typing import Any

from testbed.emu.topology import load_topology, parse_params
from testbed.errors import ConfigError
from testbed.run.records import record_line
from testbed.scenario.engine import simulate
from testbed.scenario.reactions import reactions_for
from testbed.scenario.timeline import Scenario, ScenarioError


def _state_line(rec: dict[str, Any]) -> str:
    st = rec["state"]
    if isinstance(st, str):
        return f"t={rec['t']:.2f}s {rec['link']} {st}"
    up, down = st["up"], st["down"]
    return (f"t={rec['t']:.2f}s {rec['link']} ({rec['by']}) up {up['bw_mbit']} Mbit/s "
            f"{up['delay_ms']:.4f} ms, down {down['bw_mbit']} Mbit/s {down['delay_ms']:.4f} ms")


def cmd_scenario(a: Any) -> int:
    topo, _ = load_topology(a.topology, a.topo, parse_params(a.topo_param, "-p"))
    try:
        sc = Scenario.load(a.scenario)
        sc.check(topo, reactions_for(), a.rounds)
    except ScenarioError as e:  # bad input: one line on stderr, exit 2 (testbed.cli.main.main)
        raise ConfigError(f"scenario: {e}") from e

    def show(rec: dict[str, Any]) -> None:
        line = _state_line(rec) if rec["kind"] == "link_state" else record_line(rec)
        if line:
            print(line)

    print(f"scenario {sc.name}: {len(sc.events)} events; rounds of {a.round_s:g} s (virtual), "
          f"seed {a.seed}; reactions not run")
    runner = simulate(sc, topo, seed=a.seed, rounds=a.rounds, round_s=a.round_s, log=show)
    print(f"{len(runner.link_states)} link states")
    return 0


def add_parser(sub: Any) -> None:
    """`sledge scenario` on the CLI's subparsers."""
    p = sub.add_parser("scenario", help="check a scenario against a topology and print the link "
                                        "states it would apply (no network, no root)")
    p.add_argument("scenario", help="scenario YAML, e.g. scenarios/mesh_link_cut.yaml")
    p.add_argument("topology", help="topology script")
    p.add_argument("--topo", help="topology name inside the script (default: its first)")
    p.add_argument("-p", "--topo-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-s", type=float, default=5.0, help="virtual seconds per round")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_scenario)
