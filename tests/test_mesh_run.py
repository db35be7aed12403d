"""A PSL run on a routed mesh: the experiment installs the controller's routes before the nodes
start, and the smashed data crosses exactly the hops the controller chose."""

from __future__ import annotations

import json
import os
from itertools import pairwise

import pytest

from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds

pytestmark = pytest.mark.net
MESH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "topologies",
                    "mesh.py")
CLEAN = {"loss": 0, "jitter": 0}
NOISE = 64 * 1024  # what a directed hop no route uses may still carry in a round (ARP, ND)


@pytest.fixture(scope="module")
def mesh_run(tmp_path_factory):
    """2x2 grid, both clients on m1, server m4: two disjoint two-hop paths m1 - m2|m3 - m4."""
    topo, _ = load_topology(MESH, params={"rows": 2, "cols": 2, "clients": 2, "attach": ["m1"],
                                          "links": {"mesh": CLEAN, "access": CLEAN}})
    cfg = RunConfig.from_dict(dict(
        name="mesh", dataset="digits", rounds=3, iters_per_round=20, batch_size=32,
        train_limit=None, test_limit=None, out_dir=str(tmp_path_factory.mktemp("mesh"))))
    exp = Experiment(cfg, topo, topology=MESH)
    exp.run()
    config = json.loads((exp.run_dir.path / "config.json").read_text())
    return config, read_rounds(exp.run_dir.path)


def test_psl_trains_over_controller_routes_on_a_mesh(mesh_run):
    config, rounds = mesh_run
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"] * 0.8
    assert config["placement"] == {"c1": [0], "c2": [0], "m4": [1]}
    paths = config["routes"]["paths"]
    assert set(paths) == {"c1->m4", "m4->c1", "c2->m4", "m4->c2"}
    for p in paths.values():
        assert len(p["path"]) == 4 and len({"m2", "m3"} & set(p["path"])) == 1, p


def test_smashed_data_crosses_exactly_the_chosen_hops(mesh_run):
    config, rounds = mesh_run
    paths, intf = config["routes"]["paths"], config["routes"]["interfaces"]
    hops = [h for h in intf if not h.startswith(("c1", "c2")) and not h.endswith(("c1", "c2"))]
    for r in rounds:
        # Protocol bytes each directed hop must carry: every pair's bytes on its path's hops.
        want = dict.fromkeys(hops, 0)
        for c in ("c1", "c2"):
            node = r["nodes"][c]
            for pair, nbytes in ((f"{c}->m4", node["tx_bytes"]), (f"m4->{c}", node["rx_bytes"])):
                for a, b in pairwise(paths[pair]["path"]):
                    if f"{a}->{b}" in want:
                        want[f"{a}->{b}"] += nbytes
        sent = {h: r["interfaces"][intf[h]]["tx_bytes"] for h in hops}
        used = [h for h in hops if want[h]]
        assert len(used) >= 4, want  # two hops each way, at least
        for h in hops:
            if want[h]:
                assert want[h] <= sent[h] < 1.3 * want[h] + NOISE, (h, want, sent)
            else:
                assert sent[h] < NOISE, (h, want, sent)
