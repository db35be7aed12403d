"""Clients leave and join a run (scenario events remove_client / add_client,
testbed.scenario.membership):
loopback node processes, no Mininet. A client that leaves does no work and the server's batch
holds only the members; when it joins again it trains on with the weights it left with."""

from __future__ import annotations

import os

import pytest

from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.errors import RunFailed
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds
from testbed.scenario.timeline import Scenario

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "topologies", "tiny.py")
ITERS, BATCH = 3, 16


def run(tmp_path, events, port):
    topo, _ = load_topology(TINY, params={"clients": 2})
    cfg = RunConfig.from_dict(dict(
        name="members", dataset="digits", rounds=3, iters_per_round=ITERS, batch_size=BATCH,
        train_limit=None, evaluate=False, out_dir=str(tmp_path), port=port))
    exp = Experiment(cfg, topo, topology=TINY, loopback=True,
                     scenario=Scenario.from_dict({"name": "members", "events": events}))
    exp.run()
    return read_rounds(exp.run_dir.path)


def test_a_client_leaves_for_a_round_and_joins_again(tmp_path, no_leaks):
    rounds = run(tmp_path, [{"kind": "remove_client", "node": "c2", "before_round": 2},
                            {"kind": "add_client", "node": "c2", "before_round": 3}], 22200)
    assert [r.get("absent", []) for r in rounds] == [[], ["c2"], []]
    for r, members in zip(rounds, (["c1", "c2"], ["c1"], ["c1", "c2"]), strict=True):
        for c in ("c1", "c2"):
            assert r["nodes"][c]["samples"] == (ITERS * BATCH if c in members else 0)
        assert r["nodes"]["srv"]["counters"]["server_bp_vectors"] == len(members) * ITERS * BATCH


def test_the_last_client_cannot_leave(tmp_path, no_leaks):
    with pytest.raises(RunFailed, match="remove_client c1: it is the last client"):
        run(tmp_path, [{"kind": "remove_client", "node": "c2", "before_round": 2},
                       {"kind": "remove_client", "node": "c1", "before_round": 2}], 22210)
