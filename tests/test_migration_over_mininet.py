"""Handover and model migration over real Mininet hosts (docs/migration.md).

Two cells with an edge server each (topologies/cellular.py edges=per-cell), one UE per cell,
PSL with momentum (so the optimizer has state to move). A scenario hands ue1 over to cell 2
before round 2 and back to cell 1 before round 3; the server follows it (follow: ue1) through the
registered `handover` reaction: e1's segment, weights and momentum, moves to e2 over the shaped
backhaul, the UEs repoint, round 2 trains on e2, and the segment comes back to a new node on e1
for round 3.
"""

from __future__ import annotations

import math
import os

import pytest

from nodes.migrate import checkpoint_hash
from nodes.models import build_model, split_model
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds
from testbed.scenario.timeline import Handover, Scenario

pytestmark = pytest.mark.net
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLULAR = os.path.join(ROOT, "topologies", "cellular.py")
TOPO = {"cells": 2, "ues": 1, "edges": "per-cell"}
CFG = dict(name="mig", dataset="digits", model="smallcnn", scheme="psl", rounds=3,
           iters_per_round=20, batch_size=32, lr=0.05, momentum=0.9, port=18000)


def run(tmp, loopback: bool, scenario: Scenario | None = None, on_round=None) -> Experiment:
    topo, _ = load_topology(CELLULAR, params=TOPO)
    exp = Experiment(RunConfig.from_dict({**CFG, "out_dir": str(tmp)}), topo,
                     topology="cellular", scenario=scenario, loopback=loopback,
                     on_round=on_round)
    exp.run()
    return exp


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    drive = Scenario([Handover(before_round=2, user="ue1", cell=2),
                      Handover(before_round=3, user="ue1", cell=1)], follow="ue1")
    held = {}  # round -> hash of the serving node's checkpoint after it, before any move

    def on_round(exp: Experiment, rnd: int) -> None:
        held[rnd] = checkpoint_hash(exp.node_configs[exp.roles["server"][0]]["checkpoint"])

    exp = run(tmp_path_factory.mktemp("mig"), False, drive, on_round)
    rounds = read_rounds(exp.run_dir.path)
    events = [e for r in rounds for e in r.get("events", [])]
    seen = {k: [e for e in events if e["kind"] == k] for k in ("migration", "reaction")}
    return exp, rounds, seen, held


@pytest.fixture(scope="module")
def unmoved(tmp_path_factory):
    """The same run without a handover, on the loopback network (PSL is deterministic)."""
    return read_rounds(run(tmp_path_factory.mktemp("still"), True).run_dir.path)


def test_segment_moves_with_the_same_state_and_training_goes_on(moved, unmoved):
    exp, rounds, seen, held = moved
    there, back = seen["reaction"]
    assert there["moved"] and (there["from_cell"], there["to_cell"]) == (1, 2)
    assert (there["serving"], there["target"], back["target"]) == ("e1", "e2", "e1")
    m1, m2 = seen["migration"]
    assert (m1["from"], m1["to"], m1["before_round"]) == ("e1", "e2", 2)
    assert (m2["from"], m2["to"], m2["before_round"]) == ("e2", "e1", 3)
    # What the old edge checkpointed after the round is what the new one loaded (hash after
    # the move, on the new edge), both ways.
    assert (m1["hash"], m2["hash"]) == (held[1], held[2]) and held[1] != held[2]
    assert checkpoint_hash(exp.run_dir.file("ckpt", "e1.pt")) == held[3] != m2["hash"]
    assert [sorted(r["nodes"]) for r in rounds] == [
        ["e1", "ue1", "ue2"], ["e2", "ue1", "ue2"], ["e1", "ue1", "ue2"]]
    assert exp.roles["server"] == ["e1"] and exp.placement["e1"] == [1]
    # Bit for bit the losses of the run whose server never moved: no step lost or repeated,
    # and the momentum came along (a fresh optimizer would change the next round's loss).
    assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in unmoved]
    assert rounds[-1]["test_acc"] > 0.6


def test_migration_bytes_are_the_state_and_cross_the_backhaul(moved):
    mig = moved[2]["migration"][0]
    segs = split_model(build_model("smallcnn", in_channels=1, image_size=8, num_classes=10),
                       ["conv2"])[1:]
    weights = sum(t.numel() * t.element_size() for s in segs for t in s.state_dict().values())
    momentum = sum(p.numel() * p.element_size() for s in segs for p in s.parameters())
    assert mig["state_bytes"] == weights + momentum
    assert mig["state_bytes"] < mig["bytes"] < mig["state_bytes"] + 64 * 1024  # + header
    assert list(mig["backhaul"]) == ["e1->bs1", "bs1->agg1", "agg1->bs2", "bs2->e2"]
    # Each hop's kernel counter carries the message plus TCP/IP/Ethernet framing (< 5 % at
    # 1448-byte segments), ARP and the odd retransmission (backhaul loss 1e-4).
    for hop in ("bs1->agg1", "agg1->bs2"):
        tx = mig["backhaul"][hop]["tx_bytes"]
        assert mig["bytes"] < tx < mig["bytes"] * 1.1 + 64 * 1024, (hop, tx)
    assert mig["time_s"] >= mig["transfer_s"] > 0


def test_after_each_handover_ue1_crosses_its_new_cells_link(moved):
    exp, rounds, *_ = moved
    intfs = exp.controller.intfs
    up = {c: intfs[(f"cell{c}", f"bs{c}")] for c in (1, 2)}  # the cells' shaped uplinks
    tx = {(r["round"], u): r["nodes"][u]["tx_bytes"] for r in rounds for u in ("ue1", "ue2")}
    cell = {(r["round"], c): r["interfaces"][up[c]]["tx_bytes"] for r in rounds for c in (1, 2)}
    assert cell[1, 1] >= tx[1, "ue1"] and cell[1, 2] >= tx[1, "ue2"]
    # Round 2: both UEs in cell 2, nothing but the odd broadcast on cell 1's link.
    assert cell[2, 2] >= tx[2, "ue1"] + tx[2, "ue2"] and cell[2, 1] < 16 * 1024
    # Round 3: ue1 is back in cell 1; each cell carries one UE's uplink, not both.
    assert tx[3, "ue1"] <= cell[3, 1] < tx[3, "ue1"] + tx[3, "ue2"]
    assert tx[3, "ue2"] <= cell[3, 2] < tx[3, "ue1"] + tx[3, "ue2"]
    assert math.isclose(tx[3, "ue1"], tx[1, "ue1"], rel_tol=0.01)
