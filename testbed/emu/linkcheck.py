"""Fidelity check: what each path was configured to be against what real packets measure.

For every host and the reference host (the first server, else the first host) the expected
path is computed from the declared links (networkx: shortest path; RTT = sum of one-way
delays both ways, rate = slowest link, loss = 1 - product of delivery). Then ping measures RTT
and loss and iperf3 measures TCP goodput inside the hosts' namespaces. Each row says
configured, measured, ratio and pass/fail against stated tolerances.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from typing import Any

import networkx as nx

from testbed.emu.hostload import HostSampler
from testbed.emu.linkmodel import Direction


@dataclass(frozen=True)
class Tolerance:
    rtt_rel: float = 0.05      # |RTT - configured| <= max(rtt_rel * configured, rtt_abs_ms)
    rtt_abs_ms: float = 1.0
    goodput_min: float = 0.90  # TCP goodput / configured rate (headers cost ~4-5 %)
    loss_z: float = 3.29       # binomial bound: 99.9 % two-sided


PING_FRAME_BYTES = 98  # 56 B payload + ICMP 8 + IPv4 20 + Ethernet 14


def expected_path(declared: list[tuple[str, str, Any]], a: str, b: str,
                  probe_bytes: int = PING_FRAME_BYTES) -> dict[str, float]:
    """Configured path a -> b: RTT of a probe (propagation + its serialisation on every
    rate-limited hop, both ways), slowest rate, round-trip loss."""
    g = nx.MultiGraph()
    for n1, n2, p in declared:
        g.add_edge(n1, n2, n1=n1, params=p)
    path = nx.shortest_path(g, a, b)
    fwd: list[Direction] = []
    back: list[Direction] = []
    for u, v in zip(path, path[1:], strict=False):
        data = next(iter(g.get_edge_data(u, v).values()))
        p = data["params"]
        there, here = (p.up, p.down) if data["n1"] == u else (p.down, p.up)
        fwd.append(there)
        back.append(here)
    rates = [d.bw_mbit for d in fwd if d.bw_mbit]
    deliver = math.prod(1 - d.loss for d in fwd) * math.prod(1 - d.loss for d in back)
    serialise = sum(probe_bytes * 8 / (d.bw_mbit * 1e3) for d in fwd + back if d.bw_mbit)
    return {"path": path, "rtt_ms": sum(d.delay_ms for d in fwd + back) + serialise,
            "bw_mbit": min(rates) if rates else None, "rtt_loss": 1 - deliver}


def ping(host: Any, ip: str, count: int, interval: float = 0.01) -> dict[str, float]:
    """RTT as the median of the replies (robust to a probe delayed by a busy core; the
    mean is kept too) and loss, from `count` pings."""
    out = host.cmd(f"ping -n -c {count} -i {interval} -W 2 {ip}")
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    if not m:
        raise RuntimeError(f"ping from {host.name} to {ip}: unreadable output {out[-500:]!r}")
    sent, recv = int(m.group(1)), int(m.group(2))
    rtts = [float(x) for x in re.findall(r"time=([\d.]+) ms", out)]
    return {"sent": sent, "lost": sent - recv,
            "rtt_ms": statistics.median(rtts) if rtts else math.nan,
            "rtt_mean_ms": statistics.fmean(rtts) if rtts else math.nan}


def iperf(client: Any, server: Any, seconds: float, port: int = 5201) -> float:
    """TCP goodput client -> server in Mbit/s (receiver side)."""
    srv = server.popen(["iperf3", "-s", "-1", "-p", str(port)])
    try:
        for _ in range(50):  # wait until the server listens
            if f":{port}" in server.cmd(f"ss -ltn sport = :{port}"):
                break
            client.cmd("sleep 0.05")
        # -O 1: leave slow start out, as the configured rate is a steady-state figure.
        out = client.cmd(f"iperf3 -c {server.IP()} -p {port} -t {seconds} -O 1 -J")
        res = json.loads(out[out.index("{"):])
        if "error" in res:
            raise RuntimeError(f"iperf3 {client.name} -> {server.name}: {res['error']}")
        return res["end"]["sum_received"]["bits_per_second"] / 1e6
    finally:
        if srv.poll() is None:
            srv.terminate()
        srv.wait(5)


def linkcheck(network: Any, *, pings: int = 200, iperf_s: float = 3.0,
              min_idle: float, tol: Tolerance | None = None) -> list[dict[str, Any]]:
    """Each host's path to the reference host, measured against the model. Every row also
    says how idle the host CPU was while that path was measured (`host_idle_min`) and its
    `fidelity` (degraded below `min_idle`, Mininet-HiFi's rule): a path measured on a busy
    host is not evidence against the link."""
    tol = tol or Tolerance()
    sampler = HostSampler(period_s=0.5)
    sampler.start()
    net, declared = network.net, network.links.declared
    hosts = [h for h in net.hosts if h.params.get("role") != "relay"]
    servers = [h for h in hosts if h.params.get("role") == "server"]
    ref = servers[0] if servers else hosts[0]
    rows = []
    try:
        for h in hosts:
            if h is not ref:
                rows.append(_check_path(h, ref, declared, pings, iperf_s, tol, sampler,
                                        min_idle))
    finally:
        sampler.stop()
    return rows


def _check_path(h: Any, ref: Any, declared: Any, pings: int, iperf_s: float, tol: Tolerance,
                sampler: HostSampler, min_idle: float) -> dict[str, Any]:
    t0 = sampler.snap()[0]
    exp = expected_path(declared, h.name, ref.name)
    ping(h, ref.IP(), 3)  # ARP and caches warm, not measured
    p = ping(h, ref.IP(), pings)
    row: dict[str, Any] = {"pair": f"{h.name}->{ref.name}", "path": exp["path"],
                           "rtt_cfg_ms": exp["rtt_ms"], "rtt_ms": p["rtt_ms"],
                           "loss_cfg": exp["rtt_loss"], "loss": p["lost"] / p["sent"],
                           "pings": p["sent"]}
    slack = max(tol.rtt_rel * exp["rtt_ms"], tol.rtt_abs_ms)
    row["rtt_ok"] = abs(p["rtt_ms"] - exp["rtt_ms"]) <= slack
    q, n = exp["rtt_loss"], p["sent"]
    bound = tol.loss_z * math.sqrt(max(q * (1 - q), 1e-9) / n) + 1 / n
    row["loss_ok"] = abs(row["loss"] - q) <= bound
    if exp["bw_mbit"] and iperf_s > 0:
        g = iperf(h, ref, iperf_s)
        row.update(bw_cfg_mbit=exp["bw_mbit"], goodput_mbit=g,
                   goodput_ratio=g / exp["bw_mbit"],
                   bw_ok=g / exp["bw_mbit"] >= tol.goodput_min)
    row["ok"] = all(v for k, v in row.items() if k.endswith("_ok"))
    idle = sampler.window(t0, sampler.snap()[0])["idle_min"]
    row["host_idle_min"] = idle
    row["fidelity"] = "degraded" if idle is not None and idle < min_idle else "ok"
    return row


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = f"{'pair':<14}{'RTT cfg':>9}{'RTT':>9}{'loss cfg':>10}{'loss':>8}" \
           f"{'bw cfg':>9}{'goodput':>9}{'ratio':>7}  ok   fidelity"
    lines = [head]
    for r in rows:
        bw = (f"{r['bw_cfg_mbit']:>9.1f}{r['goodput_mbit']:>9.2f}{r['goodput_ratio']:>7.3f}"
              if "bw_cfg_mbit" in r else f"{'-':>9}{'-':>9}{'-':>7}")
        lines.append(f"{r['pair']:<14}{r['rtt_cfg_ms']:>9.2f}{r['rtt_ms']:>9.2f}"
                     f"{r['loss_cfg']:>10.3f}{r['loss']:>8.3f}{bw}  "
                     f"{'yes' if r['ok'] else 'NO':<5}{r.get('fidelity', '-')}"
                     + (f" (host idle {r['host_idle_min'] * 100:.0f}%)"
                        if r.get("fidelity") == "degraded" else ""))
    return "\n".join(lines)
