"""A scenario over real Mininet hosts: scenarios/mesh_link_cut.yaml during multi-hop PSL.

2x2 mesh of edge routers, both clients on m1, the server on m4 (two disjoint paths m1 - m2 - m4
and m1 - m3 - m4). The scenario narrows m1 - m3 before round 1 (so the widest path is via m2),
cuts m1 - m2 0.5 s into round 2 and restores it after round 3. The controller re-routes around
the cut within a bounded time, the kernel counters show the traffic on the new path, and no
training step is lost or repeated: every round completes with iters x clients steps, and the
losses are bit for bit those of the same run on the loopback network with no scenario.
"""

from __future__ import annotations

import json
import os

import pytest

from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.records import read_events, read_rounds
from testbed.scenario.engine import simulate

pytestmark = pytest.mark.net
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = os.path.join(ROOT, "topologies", "mesh.py")
SCENARIO = os.path.join(ROOT, "scenarios", "mesh_link_cut.yaml")
CLEAN = {"loss": 0, "jitter": 0}
TOPO = {"rows": 2, "cols": 2, "clients": 2, "attach": ["m1"],
        "links": {"mesh": CLEAN, "access": CLEAN}}
ITERS, BATCH, CLIENTS = 20, 32, 2
CFG = dict(name="cut", dataset="digits", model="smallcnn", scheme="psl", rounds=4,
           iters_per_round=ITERS, batch_size=BATCH, evaluate=False)
NOISE = 64 * 1024  # what a hop no route uses may still carry in a round (ARP, ND)


def run(tmp, loopback: bool = False, **kw) -> Experiment:
    topo, _ = load_topology(MESH, params=TOPO)
    exp = Experiment(RunConfig.from_dict({**CFG, "out_dir": str(tmp), **kw}), topo,
                     topology=MESH, loopback=loopback)
    exp.run()
    return exp


@pytest.fixture(scope="module")
def cut(tmp_path_factory):
    exp = run(tmp_path_factory.mktemp("cut"), scenario=SCENARIO, port=17040, launcher="zygote")
    path = exp.run_dir.path
    return (exp, read_rounds(path), read_events(path),
            json.loads((path / "summary.json").read_text()))


@pytest.fixture(scope="module")
def uncut(tmp_path_factory):
    return read_rounds(run(tmp_path_factory.mktemp("uncut"), True, port=17030).run_dir.path)


def test_no_step_is_lost_or_repeated(cut, uncut):
    _, rounds, _, summary = cut
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert (summary["rounds_lost"], summary["rounds_redone"]) == (0, 0)
    for r in rounds:
        server = r["nodes"]["m4"]["counters"]
        assert server["server_steps"] == ITERS  # PSL: one step per iteration ...
        assert server["server_bp_vectors"] == ITERS * CLIENTS * BATCH  # ... over both clients
        assert [r["nodes"][c]["samples"] for c in ("c1", "c2")] == [ITERS * BATCH] * 2
    # The same arithmetic as a run that never lost a link.
    assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in uncut]


def test_the_cut_is_routed_around_within_a_bounded_time(cut):
    _, rounds, events, _ = cut
    (down,) = [e for e in events if e["kind"] == "event" and e["type"] == "link_down"]
    assert (down["round"], down["phase"], down["thread"]) == (2, "during_round", "timer")
    (state,) = [e for e in events if e["kind"] == "link_state" and e["by"] == "link_down"]
    assert state["state"] == "down" and state["link"] == "m1-m2"
    assert state["paths_changed"]["c1->m4"] == ["c1", "m1", "m3", "m4"]
    assert state["paths_changed"]["m4->c2"] == ["m4", "m3", "m1", "c2"]
    reroute = next(e for e in events if e["kind"] == "reroute" and e["by"] == "link_down")
    # Routes: a few `ip route replace` in four hosts (tens of ms). Data: TCP resends what the
    # cut dropped after one retransmission timeout (200 ms minimum, backing off 2x): 3 s
    # leaves room for two back-offs on a loaded box.
    assert reroute["routes_s"] < 2.0
    assert reroute["traffic_s"] is not None and reroute["traffic_s"] < 3.0, reroute
    # The round-2 record says what happened in it; the restore after round 3 is in round 4's.
    assert [e["type"] for e in rounds[1]["events"] if e["kind"] == "event"] == ["link_down"]
    assert [e["type"] for e in rounds[3]["events"] if e["kind"] == "event"] == ["link_up"]


def test_kernel_counters_show_the_traffic_on_the_new_path(cut):
    exp, rounds, _, _ = cut
    intf = exp.controller.intfs

    def tx(r: dict, a: str, b: str) -> int:
        return r["interfaces"][intf[(a, b)]]["tx_bytes"]

    for r in rounds:
        sent = sum(r["nodes"][c]["tx_bytes"] for c in ("c1", "c2"))  # clients -> server
        via2, via3 = tx(r, "m1", "m2"), tx(r, "m1", "m3")
        back2, back3 = tx(r, "m4", "m2"), tx(r, "m4", "m3")
        if r["round"] in (1, 4):  # the wide path, before the cut and after the restore
            assert via2 >= sent and back2 > NOISE and via3 < NOISE and back3 < NOISE, r["round"]
        elif r["round"] == 3:  # the whole round around the cut
            assert via3 >= sent and back3 > NOISE and via2 < NOISE and back2 < NOISE
        else:  # round 2: cut mid-round, both
            assert via2 > NOISE and via3 > NOISE and via2 + via3 >= sent
    assert (exp.run_dir.path / "rounds.png").stat().st_size > 10_000


def test_the_applied_link_states_are_the_planned_sequence(cut):
    """Determinism: what the run applied to the emulated links is, state by state, what the
    timeline gives on a recording network (testbed.scenario.engine.simulate) with the run's
    seed."""
    exp, _, events, _ = cut
    applied = [(e["link"], e["by"], e["state"]) for e in events if e["kind"] == "link_state"]
    plan = simulate(exp.scenario, exp.topo, seed=exp.cfg.run.seed, rounds=4, round_s=5.0)
    assert len(applied) == 3
    assert applied == [(s["link"], s["by"], s["state"]) for s in plan.link_states]
