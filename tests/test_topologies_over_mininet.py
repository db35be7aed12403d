"""The topology scripts over real Mininet hosts: every client reaches its server, and a cell's
UEs share one cell's capacity."""

from __future__ import annotations

import json
import os
import time

import pytest

from testbed.emu.capabilities import probe
from testbed.emu.linkcheck import ping
from testbed.emu.network import build_network
from testbed.emu.routing import Controller, compute_routes
from testbed.emu.topology import load_topology

pytestmark = pytest.mark.net
TOPOLOGIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "topologies")


@pytest.fixture
def build(no_leaks):
    nets = []

    def build(script, **params):
        topo, _ = load_topology(os.path.join(TOPOLOGIES, script), params=params)
        nets.append(build_network(topo, probe()))
        return nets[-1]

    yield build
    for n in nets:
        n.stop()


def reachable(net, src, dst, count=5):
    """At least one of `count` pings answered (links may have loss)."""
    return ping(net.net.get(src), net.ip(dst), count)["lost"] < count


@pytest.mark.parametrize(("script", "params"), [
    ("cellular.py", {}),
    ("cellular.py", {"cells": 2, "ues": 2, "fed": True}),
    ("hierarchical.py", {}),
    ("hierarchical.py", {"edges": 2, "users": 2}),
])
def test_l2_topology_clients_reach_the_server_without_routing_and_with_it(build, script,
                                                                          params):
    net = build(script, **params)
    [server] = net.hosts_by_role("server")
    clients = net.hosts_by_role("client")
    assert clients
    assert all(reachable(net, c, server) for c in clients), clients
    Controller(net, echo=None).install()  # harmless where no host forwards
    assert all(reachable(net, c, server) for c in clients), clients


@pytest.mark.parametrize(("script", "params", "relays"), [
    ("mesh.py", {}, True),
    ("mesh.py", {"layout": "geometric", "n": 7, "clients": 3}, True),
    ("platoon.py", {}, True),
    ("platoon.py", {"v2i": "all", "vehicles": 3}, False),  # the cell is wider than V2V
])
def test_routed_topology_clients_reach_the_server_once_the_controller_routes(build, script,
                                                                             params, relays):
    net = build(script, **params)
    [server] = net.hosts_by_role("server")
    clients = net.hosts_by_role("client")
    ctl = Controller(net, echo=None)
    pairs = [(c, server) for c in clients]
    paths = {c: compute_routes(ctl.graph(), [(c, server)])["paths"][f"{c}->{server}"]["path"]
             for c in clients}
    relayed = [c for c in clients if len([n for n in paths[c] if n in ctl.hosts]) > 2]
    assert bool(relayed) == relays, paths
    if relayed:  # a host behind a router is unreachable until routes exist
        assert not reachable(net, relayed[-1], server, count=2)
    ctl.install(pairs)
    assert all(reachable(net, c, server) for c in clients), paths


def flows(net, senders, dst, seconds):
    """Concurrent iperf3 TCP flows, one per sender, to `dst`: receiver-side Mbit/s each."""
    dst_host = net.net.get(dst)
    ports = [5301 + i for i in range(len(senders))]
    servers = [dst_host.popen(["iperf3", "-s", "-1", "-p", str(p)]) for p in ports]
    try:
        time.sleep(0.3)
        clients = [net.net.get(s).popen(["iperf3", "-c", net.ip(dst), "-p", str(p), "-t",
                                         str(seconds), "-O", "1", "-J"])
                   for s, p in zip(senders, ports, strict=True)]
        results = [json.loads(c.communicate(timeout=seconds + 20)[0]) for c in clients]
    finally:
        for s in servers:
            if s.poll() is None:
                s.terminate()
            s.wait(5)
    assert all("error" not in r for r in results), results
    return [r["end"]["sum_received"]["bits_per_second"] / 1e6 for r in results]


def test_ues_of_one_cell_share_its_uplink_and_other_cells_do_not_slow_them(build):
    cap = 20.0
    net = build("cellular.py", cells=2, ues=2,
                links={"cell": {"bw_up": cap, "loss": 0, "jitter": 0},
                       "backhaul": {"loss": 0, "jitter": 0}})
    assert net.net.get("ue3").params["cell"] == 2
    [alone] = flows(net, ["ue1"], "srv", 3)
    same_cell = flows(net, ["ue1", "ue2"], "srv", 4)
    two_cells = flows(net, ["ue1", "ue3"], "srv", 4)
    assert alone >= 0.85 * cap, alone  # one UE alone uses about all of its cell
    # Two UEs of one cell get about half each and never more than the cell together ...
    assert all(0.3 * cap <= r <= 0.7 * cap for r in same_cell), same_cell
    assert sum(same_cell) <= 1.02 * cap, same_cell
    # ... while UEs of two cells do not slow each other.
    assert all(r >= 0.8 * cap for r in two_cells), two_cells
