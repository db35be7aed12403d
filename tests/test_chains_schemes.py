"""Every split scheme over an N-segment chain (users -> edge relay -> cloud, Mininet hosts of
topologies/hierarchical.py with a fed server at the cloud site): SL, SFL-V1, SFL-V2, EPSL and
U-shaped PSL. Each run trains (loss falls), the relay's and the cloud's segments change, the
relay took the scheme's number of steps, and the kernel's interface counters show the traffic
of the cloud site crossing the edge-cloud link both ways (docs/multitier.md, "scheme x chain")."""

from __future__ import annotations

import pytest
import torch

from nodes.models import build_model, split_model
from tests.test_chains import CLEAN, NOISE, run_exp

ITERS, USERS = 8, 2
CUTS, CUTS_U = ["conv1", "conv2"], ["conv1", "conv2", "fc1"]
# name -> (scheme, options, cuts, whether the server batch concatenates the users')
CASES = {
    "sl": ("sl", {}, CUTS, False),
    "sflv1": ("sflv1", {}, CUTS, False),
    "sflv2": ("sflv2", {}, CUTS, False),
    "epsl": ("epsl", {"phi": 0.5}, CUTS, True),
    "u_psl": ("psl", {"u_shaped": True}, CUTS_U, True),
}
CLOUD_SITE = ("cloud", "fed")  # hosts behind the edge-cloud link


@pytest.fixture(scope="module", params=list(CASES))
def scheme_run(request, tmp_path_factory):
    scheme, opts, cuts, concat = CASES[request.param]
    exp, config, rounds = run_exp(
        tmp_path_factory.mktemp(request.param),
        topo_params={"users": USERS, "edges": 1, "cec_ratio": 0.5, "fed": True,
                     "links": {"access": CLEAN, "edge_cloud": CLEAN}},
        scheme=scheme, scheme_options=opts, cuts=cuts, rounds=2, iters_per_round=ITERS,
        evaluate=False, launcher="zygote")
    ckpt = {n: torch.load(c["checkpoint"], weights_only=True)["segments"]
            for n, c in exp.node_configs.items() if n in ("edge1", "cloud")}
    return request.param, config, rounds, ckpt, concat


@pytest.mark.net
def test_each_scheme_trains_over_the_chain(scheme_run):
    name, config, rounds, _, _ = scheme_run
    assert config["placement"]["edge1"] == [1]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"], name


@pytest.mark.net
def test_the_relay_and_the_cloud_train_their_segments(scheme_run):
    name, config, rounds, ckpt, concat = scheme_run
    init = split_model(build_model(**config["model"], seed=config["config"]["run"]["seed"]),
                       config["config"]["model"]["cuts"])
    for node in ("edge1", "cloud"):
        for seg, state in ckpt[node].items():
            start = init[int(seg)].state_dict()
            assert any(not torch.equal(v, start[k]) for k, v in state.items()), (name, node, seg)
    # One relay step per server update: one per iteration when the server concatenates the
    # users' batches, one per user batch otherwise.
    steps = ITERS if concat else ITERS * USERS
    assert all(r["nodes"]["edge1"]["counters"]["relay_steps"] == steps for r in rounds), name


@pytest.mark.net
def test_the_smashed_data_crosses_the_relay_hops(scheme_run):
    name, config, rounds, _, _ = scheme_run
    intf = config["routes"]["interfaces"]
    up, down = intf["es1->cs1"], intf["cs1->es1"]
    for r in rounds:
        n = r["nodes"]
        site = [n[h] for h in CLOUD_SITE if h in n]
        rx, tx = sum(h["rx_bytes"] for h in site), sum(h["tx_bytes"] for h in site)
        edge, cloud = n["edge1"]["by_type"], n["cloud"]["by_type"]
        assert edge["ACT.rx"] > 0 < edge["ACT.tx"] == cloud["ACT.rx"], name
        for sent, want in ((r["interfaces"][up]["tx_bytes"], rx),
                           (r["interfaces"][down]["tx_bytes"], tx)):
            assert want <= sent < 1.3 * want + NOISE, (name, sent, want)
    if name == "u_psl":  # labels never leave the users; the cloud's A2 goes down to them
        for node in ("edge1", "cloud"):
            assert not any(t.endswith(":labels") for r in rounds
                           for t in r["nodes"][node]["rx_tensors"]), node
        for r in rounds:  # the relay passes ACT2 and GRAD2 on unchanged
            edge = r["nodes"]["edge1"]["by_type"]
            assert edge["ACT2.rx"] == edge["ACT2.tx"] > 0 < edge["GRAD2.rx"] == edge["GRAD2.tx"]


@pytest.mark.net
def test_a_relay_does_on_its_segments_what_the_server_does(tmp_path):
    """SFL-V1 U-shaped is the same optimisation over users -> edge -> cloud as over users ->
    cloud: relay copies per user averaged each round, the cloud's A2 relayed down and its
    gradient up, the fed server's FedAvg of head and tail: the same losses."""
    topo = {"users": USERS, "edges": 1, "cec_ratio": 0.5, "fed": True,
            "links": {"access": CLEAN, "edge_cloud": CLEAN}}
    losses = {}
    for tiers in (["edge"], []):
        _, _, rounds = run_exp(tmp_path / str(len(tiers)), topo_params=topo, scheme="sflv1",
                               scheme_options={"u_shaped": True}, cuts=CUTS_U, tiers=tiers,
                               rounds=2, iters_per_round=6, evaluate=False, launcher="zygote")
        losses[len(tiers)] = [r["train_loss"] for r in rounds]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
