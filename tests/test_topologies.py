"""The topology scripts as data (no network, no root): roles, shared cells, the seed's
edge-cloud ratio, parameters from dicts and YAML files; presets as Mininet link kwargs."""

from __future__ import annotations

import os

import networkx as nx
import pytest

from testbed.emu.linkmodel import PRESETS, Direction, LinkParams
from testbed.emu.links import shaping_params
from testbed.emu.routing import graph_from_topo
from testbed.emu.topology import load_topology

TOPOLOGIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "topologies")


def topo(script, **params):
    return load_topology(os.path.join(TOPOLOGIES, script), params=params)[0]


def roles(t):
    out: dict[str, list[str]] = {}
    for h in t.hosts():
        out.setdefault(t.nodeInfo(h).get("role"), []).append(h)
    return out


def neighbours(t, node):
    return sorted(b if a == node else a for a, b in t.links() if node in (a, b))


def link_params(t, a, b):
    info = t.linkInfo(a, b)
    p = LinkParams.from_mininet(**shaping_params(info))
    return p if info["node1"] == a else LinkParams(up=p.down, down=p.up)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_survives_the_trip_through_mininet_link_kwargs(name):
    assert LinkParams.from_mininet(**PRESETS[name].to_mininet()) == PRESETS[name]


def test_mininet_link_kwargs_split_only_what_differs_per_direction():
    p = LinkParams(up=Direction(bw_mbit=5, delay_ms=2.5, queue_bytes=4000),
                   down=Direction(bw_mbit=50, delay_ms=2.5))
    assert p.to_mininet() == {"delay": "2.5ms", "bw_up": 5, "max_queue_size_up": 3,
                              "bw_down": 50}
    assert LinkParams().to_mininet() == {}


@pytest.mark.parametrize(("script", "params"), [
    ("cellular.py", {}), ("cellular.py", {"cells": 3, "ues": 2, "fed": True}),
    ("hierarchical.py", {}), ("hierarchical.py", {"edges": 3, "users": 2}),
    ("hierarchical.py", {"server": "edge"}),
    ("mesh.py", {}), ("mesh.py", {"layout": "geometric", "n": 9, "radius": 0.5, "seed": 2}),
    ("platoon.py", {}), ("platoon.py", {"v2i": "all", "vehicles": 3}),
])
def test_every_topology_has_exactly_one_server_clients_and_is_connected(script, params):
    t = topo(script, **params)
    r = roles(t)
    assert len(r["server"]) == 1 and r["client"], r
    assert nx.is_strongly_connected(graph_from_topo(t))


def test_ues_of_a_cell_share_one_shaped_link_with_the_cells_asymmetric_capacity():
    t = topo("cellular.py", cells=2, ues=3, links={"cell": {"bw_up": 20}})
    for ue in ("ue1", "ue2", "ue3"):
        assert t.nodeInfo(ue)["cell"] == 1
        assert link_params(t, ue, "cell1") == LinkParams()  # unshaped: the cell link shapes
    cell = link_params(t, "cell1", "bs1")
    assert (cell.up.bw_mbit, cell.down.bw_mbit) == (20, PRESETS["cellular"].down.bw_mbit)
    assert neighbours(t, "cell1") == ["bs1", "ue1", "ue2", "ue3"]


def test_edge_cloud_capacity_is_a_twentieth_of_the_users_access_capacity():
    up, down = PRESETS["cellular"].up.bw_mbit, PRESETS["cellular"].down.bw_mbit
    agg = link_params(topo("hierarchical.py", users=4), "es1", "cs1")
    assert (agg.up.bw_mbit, agg.down.bw_mbit) == (4 * up / 20, 4 * down / 20)
    one = link_params(topo("hierarchical.py", users=4, cec_mode="per_user"), "es1", "cs1")
    assert (one.up.bw_mbit, one.down.bw_mbit) == (up / 20, down / 20)
    fixed = topo("hierarchical.py", links={"edge_cloud": {"bw": 7}})
    assert link_params(fixed, "es1", "cs1").up.bw_mbit == 7
    assert link_params(fixed, "es1", "cs1").up.delay_ms == PRESETS["wired-backhaul"].up.delay_ms


def test_hierarchical_tiers_carry_the_seed_compute_and_roles_follow_the_server_choice():
    t = topo("hierarchical.py")
    assert roles(t)["server"] == ["cloud"] and roles(t)["edge"] == ["edge1"]
    assert [t.nodeInfo(f"u{i}")["gcycles"] for i in range(1, 6)] == [0.1, 0.2, 0.3, 0.4, 0.5]
    assert (t.nodeInfo("edge1")["gcycles"], t.nodeInfo("cloud")["gcycles"]) == (7.0, 20.0)
    e = topo("hierarchical.py", server="edge")
    assert roles(e)["server"] == ["edge1"] and roles(e)["cloud"] == ["cloud"]
    with pytest.raises(ValueError, match="exactly one edge"):
        topo("hierarchical.py", server="edge", edges=2)


def test_link_and_resource_parameters_come_from_a_yaml_file(tmp_path):
    spec = tmp_path / "p.yaml"
    spec.write_text("cell: {preset: d2d, bw: 3}\nbackhaul: lan\n")
    res = tmp_path / "r.yaml"
    res.write_text("client: {cpu: 0.25, mem_mb: 512}\n")
    t = topo("cellular.py", links=str(spec), resources=str(res))
    assert link_params(t, "cell1", "bs1") == LinkParams.from_mininet(
        **{**PRESETS["d2d"].to_mininet(), "bw": 3})
    assert link_params(t, "bs1", "agg1") == PRESETS["lan"]
    assert t.nodeInfo("ue1")["cpu"] == 0.25 and t.nodeInfo("ue1")["mem_mb"] == 512
    with pytest.raises(ValueError, match="unknown link class"):
        topo("cellular.py", links={"radio": {"bw": 1}})


def test_mesh_layouts_are_seeded_and_routers_are_the_edge_servers():
    grid = topo("mesh.py", rows=3, cols=4)
    assert len([n for n in grid.hosts() if n.startswith("m")]) == 12
    assert len([(a, b) for a, b in grid.links() if "c" not in a + b]) == 3 * 3 + 2 * 4
    assert all(grid.nodeInfo(n)["router"] for n in grid.hosts() if n.startswith("m"))
    assert not any(grid.nodeInfo(n).get("router") for n in roles(grid)["client"])
    a, b = (topo("mesh.py", layout="geometric", n=8, seed=3) for _ in range(2))
    assert sorted(a.links()) == sorted(b.links())
    with pytest.raises(ValueError, match="not connected"):
        topo("mesh.py", layout="geometric", n=8, radius=0.05)


def test_platoon_vehicles_relay_over_v2v_and_only_the_lead_reaches_the_cell_by_default():
    t = topo("platoon.py", vehicles=4)
    assert neighbours(t, "cell1") == ["srv", "v1"]
    assert link_params(t, "v1", "v2") == PRESETS["v2v"]
    assert all(t.nodeInfo(f"v{i}")["router"] for i in range(1, 5))
    assert neighbours(topo("platoon.py", v2i="all"), "cell1") == ["srv", "v1", "v2", "v3", "v4"]
