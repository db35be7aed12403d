"""The resource manager (testbed.plan.resources) against brute force on small instances; no
network."""

from __future__ import annotations

import itertools
import math
import os

import pytest

from testbed.emu.topology import load_topology
from testbed.plan.latency import Profile, network_of
from testbed.plan.resources import (
    Manager,
    fluid_finish,
    min_max_shares,
    on_demand,
    shape_access_links,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELL = ("cell1", "bs1")


def test_min_max_shares_matches_a_grid_search():
    fixed, bits, delay = [0.5, 0.1, 0.0], [3.0, 1.0, 2.0], [0.0, 0.2, 0.1]
    t, rates = min_max_shares(fixed, bits, delay, [[CELL]] * 3, {CELL: 10.0})
    assert sum(rates) == pytest.approx(10.0, rel=1e-6)
    # Every client finishes at T: the min-max optimum equalises them.
    for i in range(3):
        assert fixed[i] + bits[i] / rates[i] + delay[i] == pytest.approx(t, rel=1e-6)
    grid = [i / 200 for i in range(1, 200)]
    best = min(max(fixed[i] + bits[i] / (10 * s[i]) + delay[i] for i in range(3))
               for s in ((a, b, 1 - a - b) for a in grid for b in grid if a + b < 1))
    assert t <= best + 1e-9
    assert t == pytest.approx(best, rel=0.02)


def test_a_client_capped_by_its_own_link_leaves_the_rest_to_others():
    caps = {CELL: 10.0, ("u1", "cell1"): 2.0}
    t, rates = min_max_shares([0, 0], [4.0, 4.0], [0, 0], [[("u1", "cell1"), CELL], [CELL]], caps)
    assert rates[0] == pytest.approx(2.0, rel=1e-6)
    assert t == pytest.approx(2.0, rel=1e-6)  # u1 alone sets T; u2 needs only 2 of the 8 left


@pytest.fixture(scope="module")
def manager() -> Manager:
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "cellular.py"),
                            params={"ues": 2, "links": {"cell": {"bw_up": 2, "bw_down": 4}}})
    net = network_of(topo, ["ue1", "ue2"], "srv")
    return Manager(net, Profile.of("smallcnn", "digits"),
                   {"ue1": 0.05e9, "ue2": 0.5e9, "srv": 7e9}, batch=16)


def test_bcd_and_exhaustive_match_brute_force_over_cuts_and_shares(manager):
    grid = [i / 100 for i in range(1, 100)]

    def brute(cut):
        return min(manager.latency(cut, {CELL: {"ue1": u, "ue2": 1 - u},
                                         ("bs1", "cell1"): {"ue1": d, "ue2": 1 - d}})["total"]
                   for u, d in itertools.product(grid, grid))

    per_cut = {c: brute(c) for c in manager.cuts}
    ex, bcd = manager.exhaustive(), manager.bcd()
    assert ex.cut == min(per_cut, key=per_cut.get)
    assert ex.latency["total"] <= min(per_cut.values()) + 1e-9
    assert ex.latency["total"] == pytest.approx(min(per_cut.values()), rel=0.01)
    assert bcd.latency["total"] >= ex.latency["total"] - 1e-9
    assert bcd.latency["total"] <= bcd.history[0][1]  # never worse than equal shares
    # The slow client gets more uplink: its compute leaves it less time to transmit.
    assert ex.shares[CELL]["ue1"] > ex.shares[CELL]["ue2"]
    assert sum(ex.shares[CELL].values()) == pytest.approx(1.0)


def test_fluid_sharing_is_work_conserving_and_never_later_than_static():
    # Flow 1 alone for 1 s (4 bits), then 2 bit/s each: it ends at 2 s; flow 2 then has
    # 2 bits left at the full 4 bit/s. The last ends at total bits / capacity = 2.5 s.
    assert fluid_finish([0.0, 1.0], [6.0, 4.0], 4.0) == pytest.approx([2.0, 2.5])
    assert fluid_finish([0.0, 0.0], [4.0, 4.0], 4.0, weights=[3, 1]) == pytest.approx([4 / 3, 2])


def test_on_demand_round_is_no_slower_than_equal_static_shares(manager):
    for cut in manager.cuts:
        od = on_demand(manager, cut, CELL, (CELL[1], CELL[0]))["total"]
        assert od <= manager.latency(cut, None)["total"] + 1e-9


def test_access_links_get_their_own_shaper():
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "cellular.py"))
    shape_access_links(topo, ["ue1"], {"ue1": (2e6, 5e6)})
    (info,) = [i for a, b, i in topo.links(withInfo=True) if "ue1" in (a, b)]
    up, down = ("bw_up", "bw_down") if info["node1"] == "ue1" else ("bw_down", "bw_up")
    assert (info[up], info[down]) == (2.0, 5.0)
    assert not math.isnan(info[up])


def test_allocate_run_picks_the_cut_and_declares_per_ue_shapers():
    from testbed.plan.config import RunConfig
    from testbed.plan.resources import allocate_run

    topo, _ = load_topology(os.path.join(ROOT, "topologies", "cellular.py"),
                            params={"ues": 2, "links": {"cell": {"bw_up": 2, "bw_down": 4}}})
    cfg = RunConfig(scheme="psl", dataset="digits", cuts=["conv1"], batch_size=16,
                    cycles={"client": 0.1e9, "server": 1e9}, flops_per_cycle=16)
    new, hook = allocate_run(topo, cfg, "static", log=lambda _: None)
    assert new.model.cuts == ["fc1"]  # the smallest activation on a starved cell
    shaped = [i for a, b, i in topo.links(withInfo=True) if {a, b} & {"ue1", "ue2"}]
    assert all("bw_up" in i and "bw_down" in i for i in shaped) and len(shaped) == 2
    with pytest.raises(ValueError, match="--cycles"):
        allocate_run(topo, RunConfig(scheme="psl", dataset="digits"), "static")
    with pytest.raises(ValueError, match="two-tier PSL/EPSL"):
        allocate_run(topo, RunConfig(scheme="sflv1", dataset="digits"), "static")
