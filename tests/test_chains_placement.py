"""Chain placement as pure logic (testbed/plan/chains.py): what a segment costs in memory to train
(parameters, gradients, optimizer state, a batch's activations), how a tight mem_mb pushes a
segment to another tier, and what each scheme adds for its clients (SL's store, the fed
server); no network, no processes."""

from __future__ import annotations

import math
import os

import pytest

from nodes.models import build_model, segment_output_shape, split_model
from nodes.schemes import get_scheme
from testbed.emu.routing import place_segments
from testbed.emu.topology import load_topology
from testbed.plan.chains import place_chain, segment_bytes, segment_memory
from testbed.plan.config import RunConfig
from testbed.plan.runplan import host_roles, plan_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = {"name": "smallcnn", "num_classes": 10, "in_channels": 1, "image_size": 8}
RESNET = {"name": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 32}
ROLES = {"client": ["u1", "u2"], "edge": ["edge1"], "server": ["cloud"], "fedserver": ["fed"]}
CUTS = ["layer1.1", "layer3.1"]  # resnet18: stem..layer1 | layer2..layer3 | layer4..fc


def place(scheme: str, mem_mb: dict[str, int], momentum: float = 0.0, cuts=CUTS, **opts):
    return place_chain(get_scheme(scheme, **opts), len(cuts) + 1, ROLES, ["edge"], mem_mb,
                       RESNET, cuts, batch_size=32, momentum=momentum)


def test_segment_memory_counts_weights_gradients_optimizer_state_and_activations():
    cuts = ["conv1", "conv2"]
    params = segment_bytes(DIGITS, cuts)
    bare = segment_memory(DIGITS, cuts, 0, 0)
    assert bare == [2 * p for p in params]  # weights and their gradients
    assert [m - b for m, b in zip(segment_memory(DIGITS, cuts, 0, 1), bare,
                                  strict=True)] == params  # one momentum buffer
    # Per row: the segment's input and its units' outputs; segments 0 and 1 are one unit
    # each, so that is the input and the output (shapes probed independently).
    per_row = [m - b for m, b in zip(segment_memory(DIGITS, cuts, 1, 0), bare, strict=True)]
    shape = (1, 8, 8)
    for i, seg in enumerate(split_model(build_model(**DIGITS), cuts)[:2]):
        out = segment_output_shape(seg, shape)
        assert per_row[i] == 4 * (math.prod(shape) + math.prod(out))
        shape = out
    assert segment_memory(DIGITS, cuts, 32, 0) == [b + 32 * r for b, r in zip(
        bare, per_row, strict=True)]


def test_activations_and_momentum_push_a_segment_past_a_tight_tier():
    """resnet18's middle segment: ~10 MB of parameters, ~42 MB to train a batch of 32
    without momentum, ~52 MB with. A 48 MiB edge holds it only without momentum; counting
    parameters alone (the old rule), the edge even took the ~34 MB layer4 segment."""
    by_params = place_segments(segment_bytes(RESNET, CUTS), ["client", "edge", "server"],
                               {"edge": 48 * 2**20})
    assert by_params["segments"]["edge"]
    plain, plan = place("sl", {"edge1": 48})
    assert plain["edge1"] == [1] and plan["bytes"]["edge"] <= 48 * 2**20
    tight, plan = place("sl", {"edge1": 48}, momentum=0.9)
    assert tight["edge1"] == [] and plan["memory_model"]["optimizer_slots"] == 1
    # The users take it (76 MB each beats the cloud's 150); the cloud keeps layer4 and SL's
    # store of the users' two segments.
    assert tight["u1"] == [0, 1] and tight["cloud"] == [0, 1, 2]


def test_a_concatenating_server_tier_trains_every_users_rows():
    """PSL's relay runs both users' batches at once: twice the activations of SL's."""
    _, plan = place("psl", {"edge1": 48})
    assert plan["memory_model"]["batch_rows"] == {"client": 32, "edge": 64, "server": 64}
    assert "edge" not in plan["segments"]  # 42 MB + another batch's 21 MB > 48 MiB


def test_u_shaped_clients_keep_head_and_tail_and_the_middle_is_placed():
    cuts = ["layer1.1", "layer3.1", "layer4.1"]
    roomy, plan = place("sflv1", {"edge1": 48}, 0.0, cuts, u_shaped=True)
    assert roomy == {"u1": [0, 3], "u2": [0, 3], "edge1": [1], "cloud": [2],
                     "fed": [0, 3]}  # the fed server averages the users' pair
    assert plan["by_segment"] == ["client", "edge", "server", "client"]
    tight, _ = place("sflv1", {"edge1": 48}, 0.9, cuts, u_shaped=True)
    assert tight["edge1"] == [] and tight["cloud"] == [1, 2] and tight["u1"] == [0, 3]
    with pytest.raises(ValueError, match="do not fit"):  # the clients' pair is not movable
        place("sflv1", {"u1": 1}, 0.9, cuts, u_shaped=True)


def test_the_schemes_default_chain_placement():
    n, tiers = 4, ["edge"]
    assert get_scheme("sl").chain_placement(n, ROLES, tiers) == {
        "u1": [0], "u2": [0], "edge1": [1], "cloud": [0, 2, 3]}
    assert get_scheme("sl", handoff="p2p").chain_placement(n, ROLES, tiers)["cloud"] == [2, 3]
    assert get_scheme("sflv2").chain_placement(n, ROLES, tiers)["fed"] == [0]
    assert get_scheme("epsl", u_shaped=True).chain_placement(n, ROLES, tiers) == {
        "u1": [0, 3], "u2": [0, 3], "edge1": [1], "cloud": [2]}
    with pytest.raises(ValueError, match="does not run over a chain"):
        get_scheme("fl").chain_placement(n, ROLES, tiers)


def test_with_two_edges_each_user_is_evaluated_with_its_own_edges_segment():
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "hierarchical.py"),
                            params={"users": 1, "edges": 2})
    cfg = RunConfig.from_dict({"scheme": "sl", "cuts": ["conv1", "conv2"], "tiers": ["edge"],
                               "dataset": "digits"})
    plan = plan_run(cfg, get_scheme("sl"), topo, host_roles(topo), {}, {}, run_id="r",
                    control="ipc:///tmp/x", ip=lambda h: "127.0.0.1",
                    checkpoint=lambda h: None)
    assert plan.parts == {"u1": [("cloud", 0), ("edge1", 1), ("cloud", 2)],
                          "u2": [("cloud", 0), ("edge2", 1), ("cloud", 2)]}
