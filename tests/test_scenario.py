"""Scenario timelines without a network: YAML and its errors, the channel numbers, waypoints,
handover hysteresis, trigger order, reactions, and determinism of the link-state sequence
(testbed.scenario.engine.simulate: the same engine on a recording network with a virtual clock)."""

from __future__ import annotations

import os

import pytest

from testbed import Experiment
from testbed.emu import linkops
from testbed.emu.topology import load_topology
from testbed.errors import RunFailed
from testbed.plan.config import RunConfig
from testbed.plan.latency import path_gain
from testbed.plan.mobility import BaseStation, Mobility, Radio, waypoint_samples
from testbed.scenario import engine as sc
from testbed.scenario.engine import ScenarioRunner
from testbed.scenario.timeline import Kill, LinkDown, Move, Scenario, ScenarioError, SetLink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = os.path.join(ROOT, "scenarios")


def topo(name: str = "cellular", **params):
    return load_topology(os.path.join(ROOT, "topologies", f"{name}.py"), params=params)[0]


@pytest.fixture(scope="module")
def cells3():
    return topo(cells=3, ues=1, edges="per-cell")


# -- YAML --------------------------------------------------------------------------------------
def test_example_scenarios_load_and_fit_their_topologies(cells3):
    cut = Scenario.load(os.path.join(SCENARIOS, "mesh_link_cut.yaml"))
    assert [e.kind for e in cut.events] == ["set_link", "link_down", "link_up"]
    assert cut.events[1].trigger() == ("during_round", 2) and cut.events[1].at == 0.5
    cut.check(topo("mesh", rows=2, cols=2, attach=["m1"]), {}, rounds=4)
    drive = Scenario.load(os.path.join(SCENARIOS, "ue_drive_three_cells.yaml"))
    assert isinstance(drive.events[0], Move) and drive.positions["ue2"] == (1000.0, 150.0)
    drive.check(cells3, {"handover": lambda *a: None}, rounds=8)
    # The Python API builds the same thing; to_dict round-trips.
    d = {k: v for k, v in cut.to_dict().items() if k != "path"}
    assert Scenario.from_dict(d).to_dict() == {**d, "path": None}


@pytest.mark.parametrize("doc, message", [
    ({"events": [{"kind": "teleport", "at": 1}]},
     "events[0] field 'kind': unknown event kind 'teleport'"),
    ({"events": [{"kind": "link_down", "at": 1, "link": ["m1", "m2"], "when": 3}]},
     "events[0] (link_down) field 'when': unknown"),
    ({"events": [{"kind": "kill", "at": 1}]}, "events[0] (kill) field 'node': required"),
    ({"events": [{"kind": "link_up", "link": ["a", "b"]}]},
     "events[0] (link_up) field 'at': expected one trigger"),
    ({"events": [{"kind": "link_up", "at": 1, "after_round": 2, "link": ["a", "b"]}]},
     "events[0] (link_up) field 'at': expected one trigger"),
    ({"events": [{"kind": "link_up", "at": -2, "link": ["a", "b"]}]},
     "events[0] (link_up) field 'at': expected seconds >= 0"),
    ({"events": [{"kind": "link_up", "after_round": 0, "link": ["a", "b"]}]},
     "events[0] (link_up) field 'after_round': expected a round number >= 1"),
    ({"events": [{"kind": "set_link", "at": 0, "link": ["a"], "params": {"bw": 1}}]},
     "events[0] (set_link) field 'link'"),
    ({"events": [{"kind": "set_link", "at": 0, "link": ["a", "b"], "params": {"bw": -1}}]},
     "events[0] (set_link) field 'params': link parameter bw=-1"),
    ({"events": [{"kind": "set_link", "at": 0, "link": ["a", "b"], "params": {"bw": 1}},
                 {"kind": "move", "at": 0, "user": "u", "waypoints": [[0, 0], [1, 1]]}]},
     "events[1] (move) field 'speed': expected metres per second > 0"),
    ({"events": [{"kind": "move", "at": 0, "user": "u", "waypoints": [[0, 0], [1]],
                  "speed": 1}]}, "events[0] (move) field 'waypoints[1]'"),
    ({"events": [{"kind": "trace", "at": 0, "link": ["a", "b"], "file": "nope.csv"}]},
     "events[0] (trace) field 'file'"),
    ({"events": {"kind": "kill"}}, "field 'events': expected a list"),
    ({"events": [], "radio": {"bandwidth_hz": -1}}, "field 'radio': bandwidth_hz"),
    ({"events": [], "seed": 3}, "field 'seed': unknown"),
])
def test_bad_scenarios_name_the_event_and_field(doc, message):
    with pytest.raises(ScenarioError) as e:
        Scenario.from_dict(doc)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    (tmp_path / "bad.yaml").write_text("events: [kind: move\n")
    with pytest.raises(ScenarioError, match="bad.yaml: not valid YAML"):
        Scenario.load(str(tmp_path / "bad.yaml"))
    with pytest.raises(ScenarioError, match="missing.yaml"):
        Scenario.load(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("event, message", [
    (LinkDown(at=1, link=("bs1", "bs9")), "field 'link': no topology link bs1-bs9"),
    (LinkDown(at=1, link=("e1", "bs1")), "field 'link': e1-bs1 is not a shaped link"),
    (SetLink(after_round=9, link=("bs1", "agg1"), params={"bw": 5}),
     "field 'after_round': round 9 is after the run's last round (3)"),
    (Move(at=0, user="ue9", to=(0, 0)), "field 'user': no host 'ue9'"),
    (Kill(at=1, node="e1"), "events[0] (kill) field 'kind': no reaction registered for 'kill'"),
])
def test_check_against_topology_run_and_reactions(cells3, event, message):
    with pytest.raises(ScenarioError) as e:
        Scenario([event]).check(cells3, {}, rounds=3)
    assert message in str(e.value)


def test_a_run_with_an_unhandled_kind_fails_before_building_anything(tmp_path):
    cfg = RunConfig(name="noreact", dataset="digits", rounds=1, out_dir=str(tmp_path),
                    port=17020)
    exp = Experiment(cfg, topo(cells=1, ues=1), scenario=Scenario([Kill(at=1, node="ue1")]),
                     loopback=True)
    exp.reactions.pop("kill", None)
    with pytest.raises(RunFailed, match=r"events\[0\] \(kill\).*no reaction registered"):
        exp.run()
    assert exp.network is None and not exp.procs


# -- the channel (algorithms.md 11.1, section 12 defaults) -------------------------------------
def test_path_loss_snr_and_shannon_rate_match_hand_computed_values():
    r = Radio()
    # PL(d) = 128.1 + 37.6 log10(d / km): 90.5 dB at 100 m, 128.1 at 1 km; 10 m counts as 35 m.
    assert r.path_loss_db(100) == pytest.approx(90.5)
    assert r.path_loss_db(1000) == pytest.approx(128.1)
    assert r.path_loss_db(10) == r.path_loss_db(35) == pytest.approx(73.357, abs=1e-3)
    # Noise over B = 14 MHz: -174 + 71.461 = -102.539 dBm. Uplink at 1 km: 23.010 dBm - 128.1
    # + 102.539 = -2.551 dB; R = 14e6 log2(1 + 10^-0.2551) = 14e6 x 0.6376 = 8.927 Mbit/s.
    assert r.snr_db(128.1, 0.2) == pytest.approx(-2.551, abs=1e-3)
    assert r.rate_mbit(128.1, 0.2) == pytest.approx(8.927, abs=1e-3)
    # Downlink (1 W, 30 dBm) at 1 km: 4.439 dB -> 14e6 log2(1 + 2.779) = 26.851 Mbit/s.
    assert r.rate_mbit(128.1, 1.0) == pytest.approx(26.851, abs=1e-3)
    # Uplink at 100 m: 35.049 dB -> 14e6 log2(1 + 3198.5) = 163.009 Mbit/s.
    assert r.rate_mbit(90.5, 0.2) == pytest.approx(163.009, abs=1e-3)
    # The same channel as the latency model's (testbed.plan.latency.path_gain), and a capped rate.
    assert 10 ** (-r.path_loss_db(250) / 10) == pytest.approx(path_gain(250))
    assert Radio(max_rate_mbit=100).rate_mbit(60.0, 1.0) == 100
    # Propagation: 1.5 km at c = 5.0035 us.
    assert r.propagation_ms(1500) == pytest.approx(0.0050035, abs=1e-7)


def test_waypoints_are_sampled_at_the_speed_and_end_exactly_on_the_last_point():
    s = waypoint_samples([(0, 0), (100, 0), (100, 50)], speed=10, step=3)
    assert [t for t, _ in s] == pytest.approx([0, 3, 6, 9, 12, 15])
    assert [p for _, p in s] == [(0, 0), (30, 0), (60, 0), (90, 0), (100, 20), (100, 50)]


def test_handover_needs_the_hysteresis_and_the_shared_cell_link_sums_its_users():
    bs = [BaseStation("bs1", 1, (0.0, 0.0), "cell1"), BaseStation("bs2", 2, (1000.0, 0.0),
                                                                   "cell2")]
    m = Mobility(Radio(), bs, seed=0, cells=lambda u: 1)
    assert m.update("ue1", (400, 0)).handover is None
    # 520 m vs 480 m: 37.6 log10(520/480) = 1.3 dB < 3 dB: no handover yet.
    assert m.update("ue1", (520, 0)).handover is None
    u = m.update("ue1", (560, 0))  # 37.6 log10(560/440) = 3.9 dB
    assert (u.serving_before, u.handover, u.serving) == (1, 2, 2)
    assert [link for link, _ in u.links] == [("cell2", "bs2")]  # nobody is left in cell 1
    assert m.update("ue1", (480, 0)).handover is None  # back: 1.3 dB, it stays in cell 2
    m.update("ue2", (1000, 100))
    both = m.cell_params(2)
    r = Radio()
    want = r.rate_mbit(r.path_loss_db(520), 0.2) + r.rate_mbit(r.path_loss_db(100), 0.2)
    assert both["bw_up"] == pytest.approx(want, abs=1e-5)
    assert both["delay_up"] == pytest.approx(r.propagation_ms(520), abs=1e-6)


# -- the engine ----------------------------------------------------------------------------------
def states(runner: ScenarioRunner) -> list[tuple]:
    return [(s["t"], s["link"], s["by"], str(s["state"])) for s in runner.link_states]


def test_same_seed_same_link_states_and_shadowing_follows_the_seed(cells3):
    drive = Scenario.load(os.path.join(SCENARIOS, "ue_drive_three_cells.yaml"))
    shadowed = Scenario(drive.events, positions=drive.positions,
                        radio=Radio(shadowing_sigma_db=6.0))
    a = states(sc.simulate(shadowed, cells3, seed=7, rounds=8, round_s=8))
    assert len(a) > 50
    assert a == states(sc.simulate(shadowed, cells3, seed=7, rounds=8, round_s=8))
    assert a != states(sc.simulate(shadowed, cells3, seed=8, rounds=8, round_s=8))
    # No randomness (the spec's default: no shadowing): the seed changes nothing.
    plain = states(sc.simulate(drive, cells3, seed=7, rounds=8, round_s=8))
    assert plain == states(sc.simulate(drive, cells3, seed=8, rounds=8, round_s=8))


def test_triggers_fire_in_order_and_reactions_see_their_context(cells3, tmp_path):
    trace = tmp_path / "bw.csv"
    trace.write_text("time_s,bw\n0,20\n1.5,5\n")
    seen, later = [], []

    def on(name):
        def react(exp, ev, ctx):
            seen.append((name, ctx.index, ctx.round, ctx.phase, ctx.t, ctx.cause))
            if name == "handover":  # work for the main thread, at the next round boundary
                ctx.later(lambda exp: later.append((runner.round, runner.phase)))
            return {"ok": name}
        return react

    timeline = Scenario.from_dict({"events": [
        {"kind": "link_down", "at": 3.0, "link": ["bs1", "agg1"]},
        {"kind": "trace", "during_round": 2, "at": 0.5, "link": ["bs2", "agg1"],
         "file": str(trace)},
        {"kind": "kill", "after_round": 1, "node": "ue3"},
        {"kind": "handover", "before_round": 3, "user": "ue1", "cell": 2},
        {"kind": "link_up", "at": 99, "link": ["bs1", "agg1"]},
    ]})
    log = []
    runner = ScenarioRunner(timeline, cells3, linkops.link_ops(None, cells3), seed=0,
                            reactions={"kill": on("kill"), "handover": on("handover"),
                                       "link_down": on("link_down")}, log=log.append)
    clock = {"t": 0.0}
    for n in (1, 2, 3):
        runner.before_round(n)
        if n == 1:
            runner.start_timer(lambda: clock["t"], thread=False)
        runner.round_started(n)
        while runner._queue and runner._queue[0][0] <= 4 * n:
            clock["t"] = runner._queue[0][0]
            runner.run_due(clock["t"])
        clock["t"] = 4 * n
        runner.after_round(n)
    runner.finish()
    assert seen == [("link_down", 0, 1, "during_round", 3.0, None),
                    ("kill", 2, 1, "after_round", 4.0, None),
                    ("handover", 3, 3, "before_round", 8.0, None)]
    assert later == [(3, "before_round")]  # drained before round 3 started
    assert [(s[0], s[1], s[3]) for s in states(runner)] == [
        (3.0, "bs1-agg1", "down"),
        (4.5, "bs2-agg1", str(runner.link_states[1]["state"])),
        (6.0, "bs2-agg1", str(runner.link_states[2]["state"]))]
    assert [runner.link_states[i]["state"]["up"]["bw_mbit"] for i in (1, 2)] == [20.0, 5.0]
    assert [r for r in log if r["kind"] == "reaction"][0]["ok"] == "link_down"
    assert [(r["event"], r["due_s"]) for r in log if r["kind"] == "skipped"] == [(4, 99.0)]


def test_an_unregistered_kind_at_dispatch_fails_naming_the_event(cells3):
    runner = ScenarioRunner(Scenario([Kill(before_round=1, node="ue1")]), cells3,
                            linkops.link_ops(None, cells3), seed=0, reactions={})
    with pytest.raises(ScenarioError, match=r"events\[0\] \(kill\): no reaction registered"):
        runner.before_round(1)


def test_sledge_scenario_prints_the_link_states_without_a_network(capsys):
    from testbed.cli.main import main

    args = ["scenario", os.path.join(SCENARIOS, "mesh_link_cut.yaml"),
            os.path.join(ROOT, "topologies", "mesh.py"), "-p", "rows=2", "-p", "cols=2",
            "--rounds", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "t=5.50s m1-m2 down" in out and "t=15.00s m1-m2 up" in out
    assert out.rstrip().endswith("3 link states")
    assert main(args[:-2] + ["--rounds", "2"]) == 2  # link_up after round 3 of 2
    assert "events[2] (link_up) field 'after_round'" in capsys.readouterr().err
