"""The controller's routes in a real Mininet mesh: traffic crosses exactly the hops it chose, and
moves when a chosen hop fails."""

from __future__ import annotations

import json
import os
import sys

import pytest

from testbed.emu.capabilities import probe
from testbed.emu.network import build_network, counter_delta
from testbed.emu.routing import Controller
from testbed.emu.topology import load_topology

pytestmark = pytest.mark.net
MESH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "topologies",
                    "mesh.py")
MB = 1 << 20
CLEAN = {"loss": 0, "jitter": 0}


@pytest.fixture
def square(no_leaks):
    """c1 - m1, and two disjoint two-hop paths m1 - m2 - m4 and m1 - m3 - m4 to the server m4."""
    topo, _ = load_topology(MESH, params={"rows": 2, "cols": 2, "clients": 1,
                                          "links": {"mesh": CLEAN, "access": CLEAN}})
    net = build_network(topo, probe())
    yield net
    net.stop()


RECEIVER = """
import socket, sys
s = socket.create_server(("", int(sys.argv[1])))
print("listening", flush=True)
c, _ = s.accept()
n = 0
while chunk := c.recv(1 << 16):
    n += len(chunk)
print(n, flush=True)
c.close()
"""
SENDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(bytes(int(sys.argv[3])))
s.shutdown(socket.SHUT_WR)
s.recv(1)  # returns once the receiver has read everything and closed
"""


def send(net, src, dst, nbytes, port=5401):
    """A TCP bulk transfer of `nbytes` src -> dst, over when every byte has arrived."""
    receiver = net.net.get(dst).popen([sys.executable, "-c", RECEIVER, str(port)], text=True)
    try:
        assert receiver.stdout.readline().strip() == "listening"
        net.net.get(src).cmd(f"{sys.executable} -c '{SENDER}' {net.ip(dst)} {port} {nbytes}")
        return int(receiver.communicate(timeout=30)[0])
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait(5)


def tx_per_hop(net, ctl, hops, nbytes):
    """Bytes each (node, next node) hop's interface sent during a transfer c1 -> m4."""
    before = net.counters()
    assert send(net, "c1", "m4", nbytes) >= nbytes
    delta = counter_delta(net.counters(), before)
    return {hop: delta[ctl.intfs[hop]]["tx_bytes"] for hop in hops}


def test_traffic_crosses_exactly_the_chosen_hops_and_moves_when_one_fails(square):
    ctl = Controller(square, echo=None)
    ctl.install([("c1", "m4")])
    ctl.set_link("m1", "m3", bw=20)  # now the m2 side is wider (30 Mbit/s)
    assert ctl.state["paths"]["c1->m4"]["path"] == ["c1", "m1", "m2", "m4"]
    via_m2, via_m3 = [("m1", "m2"), ("m2", "m4")], [("m1", "m3"), ("m3", "m4")]

    tx = tx_per_hop(square, ctl, via_m2 + via_m3, 3 * MB)
    assert all(tx[h] >= 3 * MB for h in via_m2), tx
    assert all(tx[h] < 64 * 1024 for h in via_m3), tx

    state = ctl.link_down("m1", "m2")
    assert state["paths"]["c1->m4"]["path"] == ["c1", "m1", "m3", "m4"]
    assert state["down"] == [["m1", "m2"]]
    tx = tx_per_hop(square, ctl, via_m2 + via_m3, 3 * MB)
    assert all(tx[h] >= 3 * MB for h in via_m3), tx
    assert all(tx[h] < 64 * 1024 for h in via_m2), tx


def test_routes_in_the_hosts_kernels_are_the_controllers_tables(square):
    ctl = Controller(square, metric="shortest", echo=None)
    state = ctl.install([("c1", "m4")])
    json.dumps(state)  # stored with the run as it is
    assert set(state["tables"]) == {"c1", "m1", "m2", "m4"}  # m2 and m3 tie: m2 sorts first
    for host, table in state["tables"].items():
        for entry in table.values():
            kernel = square.net.get(host).cmd(f"ip -4 route show {entry['dst']}/32").split()
            assert kernel[kernel.index("dev") + 1] == entry["dev"], (host, entry, kernel)
            assert (entry["via"] is None) == ("via" not in kernel), (host, entry, kernel)
            assert entry["via"] is None or kernel[kernel.index("via") + 1] == entry["via"]
    # A router holds its address as /32: nothing is "on link" by accident.
    m1 = square.net.get("m1")
    assert f"{m1.IP()}/32" in m1.cmd(f"ip -4 addr show dev {m1.defaultIntf()}")
