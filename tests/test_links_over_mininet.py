"""Link emulation over real packets in a real Mininet net, on whatever backend this kernel has."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

import pytest

from testbed.emu.capabilities import probe
from testbed.emu.linkcheck import iperf, ping
from testbed.emu.network import build_network
from testbed.emu.topology import load_topology

pytestmark = pytest.mark.net
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")


@pytest.fixture
def tiny(no_leaks):
    nets = []

    def build(backend="auto", **params):
        # auto: netem where the kernel has it (scripts/vm.sh's guest), else the relay
        topo, _ = load_topology(TINY, params=params)
        nets.append(build_network(topo, probe(), link_backend=backend))
        return nets[-1]

    yield build
    for n in nets:
        n.stop()


def hosts(net):
    return net.net.get("c1"), net.net.get("srv")


def test_20ms_one_way_link_gives_40ms_ping_rtt(tiny):
    c1, srv = hosts(tiny(delay="20ms"))
    ping(c1, srv.IP(), 3)
    r = ping(c1, srv.IP(), 100)
    assert r["lost"] == 0
    assert abs(r["rtt_ms"] - 40.0) <= 1.5, r


def test_10_percent_loss_gives_10_percent_ping_loss_within_binomial_bounds(tiny):
    net = tiny(delay="1ms")
    net.set_link("c1", "s1", loss_up=10)  # one direction, so a ping round trip is lost w.p. 0.1
    c1, srv = hosts(net)
    n, p = 500, 0.10
    r = ping(c1, srv.IP(), n, interval=0.005)
    half_width = 3.29 * math.sqrt(n * p * (1 - p))  # 99.9 % two-sided
    assert abs(r["lost"] - n * p) <= half_width, r


def test_10_mbit_link_gives_10_mbit_tcp_goodput(tiny):
    c1, srv = hosts(tiny(bw=10))
    goodput = iperf(c1, srv, 3)
    # Frame headers cost ~4.4 % of a 1514-byte frame; the rest is the emulator's error.
    assert 9.0 <= goodput <= 10.2, goodput


def _ping_series(host, ip, seconds, interval=0.02):
    p = host.popen(["ping", "-n", "-D", "-i", str(interval), "-w", str(seconds), ip])
    return p


def _parse_series(out: str) -> list[tuple[float, float]]:
    return [(float(t), float(ms)) for t, ms in re.findall(r"\[(\d+\.\d+)\].*time=([\d.]+) ms", out)]


def test_runtime_delay_change_shows_at_once_without_restarting(tiny):
    net = tiny(delay="5ms")
    c1, srv = hosts(net)
    ping(c1, srv.IP(), 3)
    # The relay changes a link in place: no relay process is restarted for it.
    relay_pids = {x: p.pid for x, p in getattr(net.links, "procs", {}).items()}
    series = _ping_series(c1, srv.IP(), 5)  # room for a slow change (netem in a guest)
    time.sleep(1.0)
    t_call = time.time()
    net.set_link("c1", "s1", delay="30ms")
    t_change = time.time()  # in effect once the call returns (netem: a tc call per side)
    out = series.communicate(timeout=20)[0].decode()
    samples = _parse_series(out)
    before = [ms for t, ms in samples if t < t_call - 0.05]
    after = [ms for t, ms in samples if t > t_change + 0.1]
    assert before and after
    # Added delay can only raise an RTT; a busy core can raise one too, hence the median.
    assert statistics.median(before) < 15 and min(after) > 55, (before, after)
    assert {x: p.pid for x, p in getattr(net.links, "procs", {}).items()} == relay_pids


def test_runtime_bandwidth_change_shows_in_the_next_second_and_tcp_survives(tiny):
    net = tiny(bw=20)
    c1, srv = hosts(net)
    server = srv.popen(["iperf3", "-s", "-1", "-p", "5202"])
    try:
        time.sleep(0.5)
        client = c1.popen(["iperf3", "-c", srv.IP(), "-p", "5202", "-t", "5", "-i", "0.5", "-J"])
        try:
            time.sleep(2.0)
            net.set_link("c1", "s1", bw=4)
            out, _ = client.communicate(timeout=30)
        finally:
            client.kill()
            client.wait(5)
        server.wait(10)
    finally:
        server.kill()
        server.wait(5)
    res = json.loads(out)
    assert "error" not in res, res.get("error")  # the TCP connection was never reset
    rates = [(i["sum"]["start"], i["sum"]["bits_per_second"] / 1e6) for i in res["intervals"]]
    early = [r for t, r in rates if 0.5 <= t < 1.5]
    late = [r for t, r in rates if t >= 3.0]  # >= 1 s after the change
    # Sender-side intervals are bursty (socket buffer fills), so compare window means.
    assert sum(early) / len(early) > 14 and sum(late) / len(late) < 5, rates


def test_link_down_stops_traffic_and_link_up_restores_it(tiny):
    net = tiny(delay="1ms")
    c1, srv = hosts(net)
    assert ping(c1, srv.IP(), 5)["lost"] == 0
    net.link_down("c1", "s1")
    assert ping(c1, srv.IP(), 10)["lost"] == 10
    net.link_up("c1", "s1")
    assert ping(c1, srv.IP(), 5)["lost"] == 0


# Its tolerance is the project's RTT target, tighter than netem's own timing in an emulated
# (TCG) guest: there c2's 20 ms path measured 21.3 ms with the guest idle enough to count
# (docs/vm.md; docs/link-emulation.md has netem in a guest side by side with the relay).
@pytest.mark.guest_heavy
def test_sledge_linkcheck_passes_on_the_tiny_topology(no_leaks):
    sledge = os.path.join(os.path.dirname(sys.executable), "sledge")
    r = subprocess.run([sledge, "linkcheck", TINY, "-p", "delay=10ms", "-p", "bw=20",
                        "--pings", "100", "--iperf-s", "2"],
                       capture_output=True, text=True, timeout=600)  # a hang guard
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"c1->srv\s+20\.\d\d\s", r.stdout), r.stdout  # 20 ms + serialisation
    # and whether the host was idle enough for the measurement to count (Mininet-HiFi's rule)
    assert re.search(r"^c1->srv .* yes +(ok|degraded \(host idle \d+%\))$", r.stdout, re.M), \
        r.stdout


def test_a_replayed_trace_changes_the_link_on_schedule(tiny, tmp_path):
    net = tiny(delay="5ms")
    c1, srv = hosts(net)
    trace = tmp_path / "trace.csv"
    trace.write_text("time_s,delay,bw\n0,5ms,50\n1.0,40ms,50\n")
    ping(c1, srv.IP(), 3)
    series = _ping_series(c1, srv.IP(), 5)  # room for a slow change (netem in a guest)
    t0 = time.time()
    replay = net.links.replay("c1", "s1", str(trace))
    replay.join(5)
    samples = _parse_series(series.communicate(timeout=20)[0].decode())
    assert [p["delay"] for _, p in replay.applied] == ["5ms", "40ms"], replay.applied
    t_40ms = replay.applied[1][0]
    assert t_40ms >= t0 + 1.0  # not before its time in the trace
    before = [ms for t, ms in samples if t < t0 + 0.9]
    after = [ms for t, ms in samples if t > t_40ms + 0.1]
    assert before and after, samples
    assert statistics.median(before) < 15 and min(after) > 75, (before, after)


# The relay's own timing in an emulated (TCG) guest is the emulator's, not the relay's: these
# two run on the host (where auto picks the relay anyway).
@pytest.mark.guest_heavy
def test_one_relay_process_serves_many_links_and_keeps_them_apart(tiny):
    # Six shaped links, one relay process per CPU (at most 2 here): links share processes.
    net = tiny(backend="relay", clients=6, delay="2ms", bw=50)
    procs = {x: p.pid for x, p in net.links.procs.items()}
    assert len(procs) == 6 and len(set(procs.values())) < 6, procs
    net.set_link("c1", "s1", delay="20ms")  # only c1's link changes
    srv = net.net.get("srv")
    for c in ("c1", "c2", "c3"):
        ping(net.net.get(c), srv.IP(), 3)
    before = net.links.stats()
    far = ping(net.net.get("c1"), srv.IP(), 50)
    near = ping(net.net.get("c2"), srv.IP(), 50)
    after = net.links.stats()
    # Each link keeps its own model: 20 ms each way on c1's, 2 ms on c2's (its neighbour in
    # the same process when links are dealt round robin over two processes is c3's).
    assert far["lost"] == 0 and abs(far["rtt_ms"] - 40.0) <= 1.5, far
    assert near["lost"] == 0 and abs(near["rtt_ms"] - 4.0) <= 1.0, near
    # Frames never cross links: the other links carried none of the 100 pings (a few frames
    # of the hosts' own, e.g. ARP, at most).
    sent = {k: after[k]["up"]["packets"] - before[k]["up"]["packets"] for k in after}
    assert sent["c1-s1"] >= 50 and sent["c2-s1"] >= 50, sent
    assert all(sent[f"c{i}-s1"] <= 10 for i in (3, 4, 5, 6)), sent
    assert after["c1-s1"]["params"]["up"]["delay_ms"] == 20
    assert after["c3-s1"]["params"]["up"]["delay_ms"] == 2


@pytest.mark.guest_heavy
def test_one_process_per_link_is_still_selectable(tiny, monkeypatch):
    monkeypatch.setenv("SLEDGE_RELAY_PROCESSES", "0")
    net = tiny(backend="relay", clients=3, delay="5ms")
    assert len({p.pid for p in net.links.procs.values()}) == 3
    r = ping(net.net.get("c2"), net.net.get("srv").IP(), 50)
    assert r["lost"] == 0 and abs(r["rtt_ms"] - 10.0) <= 1.0, r
