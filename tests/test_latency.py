"""The latency model (testbed.plan.latency) against algorithms.md's own numbers and hand-computed
cases of section 11; no network."""

from __future__ import annotations

import os

import pytest

from nodes.models import build_model, unit_stats
from testbed.emu.topology import load_topology
from testbed.plan.latency import (
    Client,
    Path,
    Profile,
    Setup,
    hierarchical,
    network_of,
    path_gain,
    predict,
    psl_epsl,
    setup_of,
    sflv1,
    sflv2,
    shannon_rate,
    ushaped,
    vanilla_sl,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def resnet64() -> Profile:
    m = build_model("resnet18", num_classes=7, in_channels=3, image_size=64, stem="imagenet")
    return Profile.from_stats(unit_stats(m, (3, 64, 64)))


def worked_example() -> Setup:
    """Section 12: 5 clients at 50..250 m and 0.1..0.5 GHz, 14 MHz each way, 0.2 W up, 1 W
    down, broadcast over 70 MHz at the worst client's SNR."""
    d, f = [50, 100, 150, 200, 250], [0.1e9, 0.2e9, 0.3e9, 0.4e9, 0.5e9]
    clients = tuple(Client(fi, Path(shannon_rate(14e6, 0.2, path_gain(di))),
                           Path(shannon_rate(14e6, 1.0, path_gain(di))))
                    for fi, di in zip(f, d, strict=True))
    bcast = Path(min(shannon_rate(70e6, 1.0, path_gain(di)) for di in d))
    return Setup(clients, 7e9, batch=16, eta=1.0, beta=2.0, bcast=bcast)


def test_section_12_worked_example(resnet64):
    s, cut = worked_example(), resnet64.cut("layer1.0")
    totals = [psl_epsl(resnet64, s, cut, phi)["total"] for phi in (0, 0.5, 1)]
    assert totals == pytest.approx([35.6, 33.4, 31.3], abs=0.051)  # printed to 0.1 s
    one = psl_epsl(resnet64, s, cut, 1.0)
    assert one["up"] == pytest.approx(9.2, abs=0.05)
    assert one["server_f"] == pytest.approx(2.7, abs=0.05)
    assert one["server_b"] == pytest.approx(1.1, abs=0.05)
    assert psl_epsl(resnet64, s, cut, 0.0)["server_b"] == pytest.approx(5.5, abs=0.05)
    assert one["down"] == pytest.approx(18.3, abs=0.05)


def test_epsl_server_backward_is_independent_of_n_at_phi_1(resnet64):
    s = worked_example()
    more = Setup(s.clients * 2, s.f_server, bcast=s.bcast)
    cut = resnet64.cut("layer2.0")
    assert psl_epsl(resnet64, more, cut, 1.0)["server_b"] == pytest.approx(
        psl_epsl(resnet64, s, cut, 1.0)["server_b"])
    assert psl_epsl(resnet64, more, cut, 0.0)["server_b"] == pytest.approx(
        2 * psl_epsl(resnet64, s, cut, 0.0)["server_b"])


def tiny_profile() -> Profile:
    # Two units: 100 and 300 FLOPs per sample forward; 10 then 2 output elements.
    return Profile(("a", "b"), (100.0, 300.0), (10, 2), (5, 7))


def test_hand_computed_psl_round():
    p = tiny_profile()
    s = Setup((Client(100.0, Path(1000.0, 0.5), Path(2000.0, 0.25)),
               Client(200.0, Path(4000.0), Path(4000.0))),
              f_server=1000.0, batch=2, eta=1.0, beta=2.0, s_y=8, q=32)
    t = psl_epsl(p, s, 1)
    # client 1: cF = 2*100/100 = 2; U = 2*(320+8)/1000 + 0.5 = 1.156. client 2: 1 + 0.164.
    assert t["up"] == pytest.approx(2 + 0.656 + 0.5)
    assert t["server_f"] == pytest.approx(2 * 2 * 300 / 1000)          # N b Phi_s / f_s
    assert t["server_b"] == pytest.approx(2 * 2 * 2 * 300 / 1000)      # beta x that
    # client 1: D = 640/2000 + 0.25, cB = 2*2*100/100 = 4.
    assert t["down"] == pytest.approx(0.32 + 0.25 + 4)
    assert t["total"] == pytest.approx(t["up"] + t["server_f"] + t["server_b"] + t["down"])
    v1 = sflv1(p, s, 1)
    assert v1["server"] == pytest.approx(2 * 2 * 3 * 300 / 1000)
    # V2: client 2 arrives at 1.164, client 1 at 3.156; each server turn takes 1.8 s.
    v2 = sflv2(p, s, 1)
    assert v2["server_done"] == pytest.approx(3.156 + 1.8)
    assert v2["total"] == pytest.approx(3.156 + 1.8 + 0.57 + 4)


def test_vanilla_sl_is_additive_in_clients():
    p = tiny_profile()
    c = Client(100.0, Path(1000.0), Path(1000.0))
    one = vanilla_sl(p, Setup((c,), 1000.0, batch=2), 1)
    three = vanilla_sl(p, Setup((c, c, c), 1000.0, batch=2), 1)
    assert three["train"] == pytest.approx(3 * one["train"])
    sw = 5 * 32  # one unit's params, fp32
    assert three["handoff"] == pytest.approx(3 * sw / 1000 + 2 * sw / 1000)


def test_ushaped_counts_four_transfers():
    p = Profile(("a", "b", "c"), (10.0, 20.0, 30.0), (4, 2, 1), (1, 1, 1))
    s = Setup((Client(10.0, Path(100.0), Path(200.0)),), 100.0, batch=1, q=1)
    t = ushaped(p, s, 1, 2)
    assert t["comm"] == pytest.approx(4 / 100 + 2 / 200 + 2 / 100 + 4 / 200)
    assert t["client"] == pytest.approx((10 + 3 * 30 + 2 * 10) / 10)
    assert t["server"] == pytest.approx(3 * 20 / 100)


def test_hierarchical_optimum_beats_both_two_tier_splits(resnet64):
    s = worked_example()
    ec = Path(sum(c.up.rate_bps for c in s.clients) / 20)
    L = resnet64.units

    def t(l1, l2):
        return hierarchical(resnet64, s, l1, l2, 20e9, ec, ec)["total"]

    best = min(t(a, b) for a in range(1, L) for b in range(a, L + 1))
    assert best <= min(t(a, L) for a in range(1, L)) + 1e-12
    assert best <= min(t(a, a) for a in range(1, L)) + 1e-12
    assert hierarchical(resnet64, s, 3, L, 20e9, ec, ec)["edge_cloud"] == 0


def test_cellular_topology_gives_equal_cell_shares_and_summed_delays():
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "cellular.py"),
                            params={"ues": 2, "links": {"cell": {"bw_up": 8, "bw_down": 16}}})
    net = network_of(topo, ["ue1", "ue2"], "srv")
    assert ("cell1", "bs1") in net.shared()
    s = setup_of(net, {"ue1": 1e8, "ue2": 2e8, "srv": 7e9}, batch=4)
    for c in s.clients:
        assert c.up.rate_bps == pytest.approx(4e6)      # 8 Mbit/s split by 2
        assert c.down.rate_bps == pytest.approx(8e6)
        assert c.up.delay_s == pytest.approx(0.011)     # cell 10 ms + backhaul 1 ms
    p = Profile.of("smallcnn", "digits")
    assert predict("epsl", {"phi": 0}, p, s, ["conv1"]) == psl_epsl(p, s, 1)
    with pytest.raises(ValueError, match="cut 'fc2' is not a cut point"):
        predict("psl", {}, p, s, ["fc2"])
    with pytest.raises(ValueError, match="no cycles/s for host"):
        setup_of(net, {"ue1": 1e8}, batch=4)
