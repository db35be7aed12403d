"""Route computation and segment placement, on graphs and unbuilt topologies (no root needed)."""

from __future__ import annotations

import json
import os
from itertools import pairwise

import pytest

from testbed.emu.linkmodel import LinkParams
from testbed.emu.routing import (
    PLACEMENT_RULE,
    RouteError,
    compute_routes,
    graph_from_topo,
    path_of,
    place_segments,
    route_tree,
    topology_graph,
)
from testbed.emu.topology import load_topology

TOPOLOGIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "topologies")


def link(a, b, **mininet):
    return (a, b, LinkParams.from_mininet(**mininet))


def graph(links, routers=("r1", "r2", "r3", "r4"), switches=(), down=()):
    names = {n for a, b, _ in links for n in (a, b)}
    nodes = {n: {"router": n in routers, "isSwitch": n in switches, "role": "x"} for n in names}
    return topology_graph(nodes, links, down)


# Two ways from a to b: a - r1 - b is short but narrow, a - r2 - r3 - b is wide but long.
DIAMOND = [link("a", "r1", bw=10, delay="1ms"), link("r1", "b", bw=10, delay="1ms"),
           link("a", "r2", bw=100, delay="5ms"), link("r2", "r3", bw=100, delay="5ms"),
           link("r3", "b", bw=100, delay="5ms")]


def test_widest_path_takes_the_largest_bottleneck_even_when_longer():
    r = compute_routes(graph(DIAMOND), [("a", "b")], "widest")
    assert r["paths"]["a->b"] == {"path": ["a", "r2", "r3", "b"], "bw_mbit": 100.0,
                                  "delay_ms": 15.0}


def test_shortest_path_takes_the_least_delay_even_when_narrower():
    r = compute_routes(graph(DIAMOND), [("a", "b")], "shortest")
    assert r["paths"]["a->b"]["path"] == ["a", "r1", "b"]
    assert r["paths"]["a->b"]["delay_ms"] == 2.0


def test_widest_path_breaks_a_capacity_tie_towards_less_delay():
    links = [link("a", "r1", bw=50, delay="9ms"), link("r1", "b", bw=50),
             link("a", "r2", bw=50, delay="1ms"), link("r2", "b", bw=50)]
    assert path_of(route_tree(graph(links), "b"), "a", "b") == ["a", "r2", "b"]


def test_each_direction_is_routed_on_its_own_capacity():
    # r1's side is wide towards b and narrow back; r2's the other way round.
    links = [link("a", "r1", bw_up=100, bw_down=1), link("r1", "b", bw_up=100, bw_down=1),
             link("a", "r2", bw_up=1, bw_down=100), link("r2", "b", bw_up=1, bw_down=100)]
    r = compute_routes(graph(links), [("a", "b"), ("b", "a")])
    assert r["paths"]["a->b"]["path"] == ["a", "r1", "b"]
    assert r["paths"]["b->a"]["path"] == ["b", "r2", "a"]


def test_hosts_that_are_not_routers_never_carry_traffic():
    # h is a host with two links but not a router: the only way left is the narrow r1.
    links = [link("a", "h", bw=100), link("h", "b", bw=100),
             link("a", "r1", bw=1), link("r1", "b", bw=1)]
    r = compute_routes(graph(links), [("a", "b")])
    assert r["paths"]["a->b"]["path"] == ["a", "r1", "b"]


def test_a_down_link_is_avoided_and_a_cut_off_pair_is_reported_unreachable():
    down = compute_routes(graph(DIAMOND, down=[("r3", "b")]), [("a", "b")])
    assert down["paths"]["a->b"]["path"] == ["a", "r1", "b"]
    cut = compute_routes(graph(DIAMOND, down=[("r3", "b"), ("b", "r1")]), [("a", "b")])
    assert cut["paths"] == {} and cut["unreachable"] == ["a->b"]
    with pytest.raises(RouteError, match="a -> b"):
        path_of(route_tree(graph(DIAMOND, down=[("r3", "b"), ("r1", "b")]), "b"), "a", "b")


def test_next_hops_skip_switches_and_name_the_neighbour_to_leave_towards():
    links = [link("a", "s1"), link("s1", "r1"), link("r1", "s2"), link("s2", "b")]
    r = compute_routes(graph(links, switches=("s1", "s2")), [("a", "b")])
    assert r["next_hops"] == {"a": {"b": ["r1", "s1"]}, "r1": {"b": ["b", "s2"]}}


def test_routes_of_many_sources_to_one_destination_agree_at_shared_hops():
    g = graph_from_topo(load_topology(os.path.join(TOPOLOGIES, "mesh.py"),
                                      params={"rows": 3, "cols": 3, "clients": 3})[0])
    r = compute_routes(g, [(c, "m9") for c in ("c1", "c2", "c3")])
    for p in r["paths"].values():  # every path follows the one table of next hops
        hosts = [n for n in p["path"] if not g.nodes[n]["switch"]]
        for here, there in pairwise(hosts):
            assert r["next_hops"][here]["m9"][0] == there
    json.dumps(r)


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="widest"):
        compute_routes(graph(DIAMOND), [("a", "b")], "fastest")


# -- placement ---------------------------------------------------------------------------------
def test_placement_keeps_order_and_balances_the_bytes_nodes_hold():
    p = place_segments([4, 4, 4, 4], ["u", "e", "c"])
    assert max(p["bytes"].values()) == 8  # not 12 or 16
    assert p["by_segment"] == ["u", "u", "e", "e"]  # of the ties, the one nearest the data
    assert place_segments([1, 10, 1], ["u", "e", "c"])["by_segment"] == ["u", "e", "c"]
    assert p["rule"] == PLACEMENT_RULE
    json.dumps(p)


def test_placement_ties_leave_more_on_earlier_nodes():
    assert place_segments([1, 1, 1], ["u", "e"])["by_segment"] == ["u", "u", "e"]


def test_placement_respects_memory_limits_and_keeps_segment_0_on_the_first_node():
    p = place_segments([5, 1, 1, 9], ["u", "e", "c"], {"u": 6, "e": 1})
    assert p["by_segment"] == ["u", "u", "e", "c"]
    assert p["segments"] == {"u": [0, 1], "e": [2], "c": [3]}
    one = place_segments([1, 1], ["u", "e", "c"])  # fewer segments than nodes
    assert one["by_segment"] == ["u", "e"]  # the last node need not hold anything


def test_placement_that_cannot_fit_names_the_limits():
    with pytest.raises(ValueError, match="memory limits"):
        place_segments([5, 5], ["u", "e"], {"u": 4})
    with pytest.raises(ValueError, match="memory limits"):
        place_segments([1, 9], ["u", "e"], {"u": 5, "e": 5})
