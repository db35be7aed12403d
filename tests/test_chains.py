"""N-segment chains: a model cut twice, its segments on users, an edge relay and the cloud
(topologies/hierarchical.py); activations relayed up and gradients down hop by hop."""

from __future__ import annotations

import json
import math
import os

import pytest

from nodes.models import build_model, segment_output_shape, split_model
from nodes.schemes import get_scheme
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.errors import ConfigError, RunFailed
from testbed.plan.chains import place_chain
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds
from tests.test_schemes_loopback import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIER = os.path.join(ROOT, "topologies", "hierarchical.py")
PLATOON = os.path.join(ROOT, "topologies", "platoon.py")
TINY = os.path.join(ROOT, "topologies", "tiny.py")
CLEAN = {"loss": 0, "jitter": 0}
CUTS = ["conv1", "conv2"]
BATCH, ITERS = 32, 20
NOISE = 64 * 1024


def run_exp(tmp_path, topo_path=HIER, topo_params=None, loopback=False,
            **cfg) -> tuple[Experiment, dict, list[dict]]:
    """One run (by default users -> edge -> cloud, two users): the experiment, its
    config.json and its rounds."""
    params = topo_params if topo_params is not None else {
        "users": 2, "edges": 1, "cec_ratio": 0.5,
        "links": {"access": CLEAN, "edge_cloud": CLEAN}}
    topo, _ = load_topology(topo_path, params=params)
    base = dict(name="chain", dataset="digits", rounds=3, iters_per_round=ITERS,
                batch_size=BATCH, train_limit=None, test_limit=None, cuts=CUTS,
                tiers=["edge"], out_dir=str(tmp_path))
    exp = Experiment(RunConfig.from_dict({**base, **cfg}), topo, topology=topo_path,
                     loopback=loopback)
    exp.run()
    config = json.loads((exp.run_dir.path / "config.json").read_text())
    return exp, config, read_rounds(exp.run_dir.path)


def run(tmp_path, topo_path=HIER, topo_params=None, loopback=False, **cfg):
    return run_exp(tmp_path, topo_path, topo_params, loopback, **cfg)[1:]


def act_bytes(segments: int, cuts: list[str] = CUTS) -> int:
    """Bytes of one batch of activations after the first `segments` segments (float32)."""
    parts = split_model(build_model("smallcnn", in_channels=1, image_size=8, num_classes=10),
                        cuts)
    shape = (1, 8, 8)
    for seg in parts[:segments]:
        shape = segment_output_shape(seg, shape)
    return BATCH * 4 * math.prod(shape)


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    return run(tmp_path_factory.mktemp("chain"))


@pytest.mark.net
def test_three_segment_chain_trains_over_mininet(chain_run):
    config, rounds = chain_run
    assert config["placement"] == {"u1": [0], "u2": [0], "edge1": [1], "cloud": [2]}
    assert config["connections"]["u1"]["peers"] == {"cloud": config["connections"]["edge1"][
        "listen"]}
    assert set(config["connections"]["edge1"]["proxies"]) == {"u1", "u2"}
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"] * 0.7
    assert rounds[-1]["test_acc"] > 0.6  # chance is 0.1
    assert all(r["nodes"]["edge1"]["counters"]["relay_steps"] == ITERS for r in rounds)


@pytest.mark.net
def test_each_hop_carries_the_activations_of_its_cut(chain_run):
    config, rounds = chain_run
    a1, a2, labels = act_bytes(1), act_bytes(2), BATCH * 8
    up = config["routes"]["interfaces"]["es1->cs1"]
    for r in rounds:
        n, k = r["nodes"], 2 * r["iters"]  # two users' batches per step
        for u in ("u1", "u2"):
            assert n[u]["tx_bytes"] == r["iters"] * (a1 + labels) + n[u]["tx_header_bytes"]
            assert n[u]["rx_bytes"] == r["iters"] * a1 + n[u]["rx_header_bytes"]
        e, c = n["edge1"], n["cloud"]
        assert e["tx_bytes"] == k * (a2 + labels + a1) + e["tx_header_bytes"]
        assert e["rx_bytes"] == k * (a1 + labels + a2) + e["rx_header_bytes"]
        assert c["rx_bytes"] == k * (a2 + labels) + c["rx_header_bytes"]
        assert c["tx_bytes"] == k * a2 + c["tx_header_bytes"]
        # Only the second cut's activations cross the edge-cloud link (a1 is twice a2).
        sent = r["interfaces"][up]["tx_bytes"]
        assert c["rx_bytes"] <= sent < 1.3 * c["rx_bytes"] + NOISE, (sent, c["rx_bytes"])


@pytest.mark.net
def test_a_model_split_over_three_vehicles_and_the_edge_server_trains(tmp_path):
    """The rear vehicle holds the data and the first segment, the two ahead of it relay the
    next two over V2V links, the edge server behind the cell runs the rest."""
    cuts = ["conv1", "conv2", "fc1"]
    config, rounds = run(tmp_path, PLATOON, topo_params={"vehicles": 3, "links": {
        "v2v": {"bw": 50, **CLEAN}, "cell": CLEAN}}, cuts=cuts, tiers=["hop1", "hop2"],
        roles={"v2": "hop1", "v1": "hop2"}, iters_per_round=30)
    assert config["placement"] == {"v3": [0], "v2": [1], "v1": [2], "srv": [3]}
    assert {p: v["path"] for p, v in config["routes"]["paths"].items()} == {
        "v3->v2": ["v3", "v2"], "v2->v3": ["v2", "v3"], "v2->v1": ["v2", "v1"],
        "v1->v2": ["v1", "v2"], "v1->srv": ["v1", "cell1", "srv"],
        "srv->v1": ["srv", "cell1", "v1"]}
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"] * 0.7
    a1, a2, a3, labels = (*(act_bytes(i, cuts) for i in (1, 2, 3)), BATCH * 8)
    for r in rounds:
        n, k = r["nodes"], r["iters"]
        assert n["v3"]["tx_bytes"] == k * (a1 + labels) + n["v3"]["tx_header_bytes"]
        assert n["v2"]["tx_bytes"] == k * (a2 + labels + a1) + n["v2"]["tx_header_bytes"]
        assert n["v1"]["tx_bytes"] == k * (a3 + labels + a2) + n["v1"]["tx_header_bytes"]
        assert n["srv"]["tx_bytes"] == k * a3 + n["srv"]["tx_header_bytes"]


def test_a_relay_tier_computes_what_the_two_tier_server_would(tmp_path):
    """PSL is the same optimisation whether the server's segments sit on one node or on an
    edge relay and the cloud: the same losses, round after round (summation order aside).
    (SFL-V1 U-shaped: tests/test_chains_schemes.py.)"""
    port = free_ports()
    _, chain = run(tmp_path / "chain", loopback=True, evaluate=False, port=port)
    _, flat = run(tmp_path / "flat", loopback=True, evaluate=False, tiers=[], port=port)
    assert [r["train_loss"] for r in chain] == pytest.approx(
        [r["train_loss"] for r in flat], rel=1e-4)


def test_memory_limits_hand_the_chain_placement_to_the_controller(tmp_path):
    """With mem_mb declared on a tier, the controller's placement (min-max training memory,
    tests/test_chains_placement.py) replaces the scheme's: here the users take two segments,
    the edge one, the cloud one."""
    cuts = ["conv1", "conv2", "fc1"]
    kwargs = {"name": "smallcnn", "num_classes": 10, "in_channels": 1, "image_size": 8}
    roles = {"client": ["u1", "u2"], "edge": ["edge1"], "server": ["cloud"]}
    expected, plan = place_chain(get_scheme("psl"), 4, roles, ["edge"], {"edge1": 64},
                                 kwargs, cuts, BATCH, 0.9)
    config, rounds = run(tmp_path, loopback=True, cuts=cuts, mem_mb={"edge": 64},
                         iters_per_round=30)
    assert config["placement"] == expected
    assert expected != {"u1": [0], "u2": [0], "edge1": [1], "cloud": [2, 3]}  # the scheme's
    assert config["placement_plan"]["by_segment"] == plan["by_segment"]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"] * 0.7
    with pytest.raises(RunFailed, match="do not fit"):
        run(tmp_path, loopback=True, model="resnet18", cuts=["layer1.1", "layer3.1"],
            mem_mb={"client": 1, "edge": 1, "server": 1})


def test_chains_fail_early_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match="more cut points than relay tiers"):
        RunConfig.from_dict({"tiers": ["edge"], "cuts": ["conv2"]})
    with pytest.raises(RunFailed, match=r"need at least 3 cuts \(u_shaped\), got 2"):
        run(tmp_path, loopback=True, scheme_options={"u_shaped": True})
    with pytest.raises(RunFailed, match="does not run over a chain"):
        run(tmp_path, loopback=True, scheme="fl")
    with pytest.raises(RunFailed, match=r"role \['edge'\]"):
        run(tmp_path, TINY, topo_params={}, loopback=True)
