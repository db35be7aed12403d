"""Handover and model migration over real Mininet hosts (docs/migration.md).

Two cells with an edge server each (topologies/cellular.py edges=per-cell), one UE per cell,
PSL with momentum (so the optimizer has state to move). After round 1, ue1 hands over to cell 2;
the server follows it (follow=ue1): e1's segment, weights and momentum, moves to e2 over the
shaped backhaul, the UEs repoint, and rounds 2 and 3 train on e2.
"""

from __future__ import annotations

import math
import os

import pytest

from nodes.migrate import checkpoint_hash
from nodes.models import build_model, split_model
from testbed import migration
from testbed.cli import load_topology
from testbed.config import RunConfig
from testbed.experiment import Experiment
from testbed.metrics import read_rounds

pytestmark = pytest.mark.net
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLULAR = os.path.join(ROOT, "topologies", "cellular.py")
TOPO = {"cells": 2, "ues": 1, "edges": "per-cell"}
CFG = dict(name="mig", dataset="digits", model="smallcnn", scheme="psl", rounds=3,
           iters_per_round=20, batch_size=32, lr=0.05, momentum=0.9, port=18000)


def run(tmp, loopback: bool, on_round=None) -> Experiment:
    topo, _ = load_topology(CELLULAR, params=TOPO)
    exp = Experiment(RunConfig.from_dict({**CFG, "out_dir": str(tmp)}), topo,
                     topology="cellular", on_round=on_round, loopback=loopback)
    exp.run()
    return exp


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
    seen = {}

    def on_round(exp: Experiment, rnd: int) -> None:
        if rnd == 1:  # e1's state as its own checkpoint wrote it, before anything moves
            seen["before"] = checkpoint_hash(exp.node_configs["e1"]["checkpoint"])
            seen["events"] = migration.handover(exp, "ue1", 2, rnd + 1, follow="ue1")

    exp = run(tmp_path_factory.mktemp("mig"), False, on_round)
    return exp, read_rounds(exp.run_dir.path), seen


@pytest.fixture(scope="module")
def unmoved(tmp_path_factory):
    """The same run without a handover, on the loopback network (PSL is deterministic)."""
    return read_rounds(run(tmp_path_factory.mktemp("still"), True).run_dir.path)


def test_segment_moves_with_the_same_state_and_training_goes_on(moved, unmoved):
    exp, rounds, seen = moved
    hand, mig = seen["events"]
    assert hand["kind"] == "handover" and hand["moved"] and hand["to_cell"] == 2
    assert (mig["kind"], mig["from"], mig["to"]) == ("migration", "e1", "e2")
    # What e1 checkpointed after round 1 is what e2 loaded (hash after the move, on e2).
    assert seen["before"] == mig["hash"]
    assert checkpoint_hash(exp.node_configs["e2"]["checkpoint"]) != mig["hash"]  # trained on
    assert [sorted(r["nodes"]) for r in rounds] == [["e1", "ue1", "ue2"]] + [["e2", "ue1",
                                                                             "ue2"]] * 2
    assert rounds[1]["events"] == [hand, mig] and "events" not in rounds[2]
    assert exp.roles["server"] == ["e2"] and exp.placement["e2"] == [1]
    # Bit for bit the losses of the run whose server never moved: no step lost or repeated,
    # and the momentum came along (a fresh optimizer would change round 2's loss).
    assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in unmoved]
    assert rounds[-1]["test_acc"] > 0.6


def test_migration_bytes_are_the_state_and_cross_the_backhaul(moved):
    exp, _, seen = moved
    mig = seen["events"][1]
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


def test_after_handover_ue1_crosses_cell2s_link(moved):
    exp, rounds, _ = moved
    intfs = exp.controller.intfs
    up = {c: intfs[(f"cell{c}", f"bs{c}")] for c in (1, 2)}
    sent = {r["round"]: r["nodes"]["ue1"]["tx_bytes"] + r["nodes"]["ue2"]["tx_bytes"]
            for r in rounds}
    # Round 1: one UE per cell; round 3: both UEs' uplink on cell 2's shaped link, none on 1's.
    assert rounds[0]["interfaces"][up[1]]["tx_bytes"] >= sent[1] / 2
    assert rounds[2]["interfaces"][up[2]]["tx_bytes"] >= sent[3]
    assert rounds[2]["interfaces"][up[1]]["tx_bytes"] < 16 * 1024
    assert math.isclose(sent[3], sent[1], rel_tol=0.01)
