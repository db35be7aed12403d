#!/usr/bin/env python3
"""Link fidelity: configured vs measured RTT and goodput over the backend this kernel uses.

For bw in {1, 10, 50, 100} Mbit/s and one-way delay in {0, 5, 20, 50} ms, a tiny topology is
built with that client link (the server link unshaped), then ping (RTT) and iperf3 (TCP
goodput) run between c1 and srv. Writes JSON and prints a table of measured/configured ratios.
Targets: goodput/configured >= 0.97, |RTT - configured| <= max(3 %, 0.3 ms).

    sudo .venv/bin/python benchmarks/link_fidelity.py [--out benchmarks/results/link_fidelity.json]

--near-zero: the relay's own cost. The same ping over an unshaped link (no relay) and over
links of 10 Gbit/s (serialisation of a ping frame ~0.1 us, so only the relay node is added)
with one-way delay 0, 0.5, 1 and 2 ms, side by side in one run. Per-pass latency = (RTT through
the relay at 0 ms - RTT without it) / 2 (a round trip passes the relay twice); RTT error at each
delay against the target max(3 %, 0.3 ms).

    sudo .venv/bin/python benchmarks/link_fidelity.py --near-zero

--guest: the grid twice from one command, side by side: on this machine's backend (the relay
where the kernel has no netem) and with netem in a Debian guest booted by scripts/vm.sh (build
its image first). The host's idle CPU while the guest ran is noted: netem in an emulated guest
on a loaded host is a second measurement, not ground truth.

    sudo .venv/bin/python benchmarks/link_fidelity.py --guest
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from testbed.emu.capabilities import probe
from testbed.emu.linkcheck import PING_FRAME_BYTES, iperf, ping
from testbed.emu.network import build_network
from testbed.emu.topology import load_topology
from testbed.run.fidelity import watch_host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BWS = (1, 10, 50, 100)
# Goodput / configured rate to reach: TCP payload per wire byte of a full frame is 1448/1514 =
# 0.956, the ceiling of any backend that charges the rate in wire bytes (as HTB and netem do).
GOODPUT_TARGET = 0.95
DELAYS = (0, 5, 20, 50)


def measure(bw: float, delay: float, pings: int, iperf_s: float) -> dict:
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"),
                            params={"bw": bw, "delay": f"{delay}ms", "clients": 1})
    net = build_network(topo, probe())
    try:
        c1, srv = net.net.get("c1"), net.net.get("srv")
        ping(c1, srv.IP(), 3)
        # Ping at 20 ms intervals: idle-link RTT, not the RTT under the iperf3 load.
        p = ping(c1, srv.IP(), pings, interval=0.02)
        g = iperf(c1, srv, iperf_s)
    finally:
        net.stop()
    # Propagation both ways plus the ping frame's own serialisation at the link rate.
    rtt_cfg = 2 * delay + 2 * PING_FRAME_BYTES * 8 / (bw * 1e3)
    return {"bw_mbit": bw, "delay_ms": delay, "rtt_cfg_ms": rtt_cfg, "rtt_ms": p["rtt_ms"],
            "rtt_err_ms": p["rtt_ms"] - rtt_cfg, "goodput_mbit": g, "goodput_ratio": g / bw,
            "rtt_ok": abs(p["rtt_ms"] - rtt_cfg) <= max(0.03 * rtt_cfg, 0.3),
            "goodput_ok": g / bw >= GOODPUT_TARGET}


NEAR_ZERO_DELAYS = (0, 0.5, 1, 2)
NEAR_ZERO_BW = 10_000  # Mbit/s: shaped (so a relay is in the path) but no serialisation to speak of


def idle_rtt(params: dict, pings: int) -> float:
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"),
                            params={"clients": 1, **params})
    net = build_network(topo, probe())
    try:
        c1, srv = net.net.get("c1"), net.net.get("srv")
        ping(c1, srv.IP(), 3)
        return ping(c1, srv.IP(), pings, interval=0.02)["rtt_ms"]
    finally:
        net.stop()


def near_zero(pings: int, out: str) -> int:
    base = idle_rtt({"bw": None, "delay": "0ms"}, pings)
    rows = []
    for d in NEAR_ZERO_DELAYS:
        with watch_host() as host:  # a busy host makes frames late: say so per row
            rtt = idle_rtt({"bw": NEAR_ZERO_BW, "delay": f"{d}ms"}, pings)
        cfg = 2 * d
        # Error against the configured RTT plus what the same path costs without a relay.
        err = rtt - base - cfg
        rows.append({"delay_ms": d, "rtt_cfg_ms": cfg, "rtt_ms": rtt, "rtt_no_relay_ms": base,
                     "rtt_err_ms": err, "rtt_ok": abs(err) <= max(0.03 * cfg, 0.3),
                     "fidelity": host["verdict"], "host_idle_min": host["idle_min"]})
        print(json.dumps(rows[-1]), flush=True)
    per_pass = (rows[0]["rtt_ms"] - base) / 2
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"per_pass_ms": per_pass, "rtt_no_relay_ms": base, "rows": rows}, f, indent=2)
    print(f"\nRTT without relay {base:.3f} ms; relay per-pass latency {per_pass:.3f} ms\n")
    print("| one-way delay ms | RTT cfg ms | RTT meas - no-relay RTT ms | error ms | ok |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['delay_ms']} | {r['rtt_cfg_ms']:.1f} | {r['rtt_ms'] - base:.3f} | "
              f"{r['rtt_err_ms']:+.3f} | {'yes' if r['rtt_ok'] else 'no'} |")
    print(f"\nwritten: {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "link_fidelity.json"))
    ap.add_argument("--pings", type=int, default=100)
    ap.add_argument("--iperf-s", type=float, default=4.0)
    ap.add_argument("--near-zero", action="store_true",
                    help="measure the relay's per-pass latency and RTT error at 0-2 ms")
    ap.add_argument("--guest", action="store_true",
                    help="this machine's backend and netem in a scripts/vm.sh guest, side by side")
    a = ap.parse_args()
    if a.near_zero:
        return near_zero(a.pings, os.path.join(ROOT, "benchmarks", "results",
                                               "link_fidelity_near_zero.json"))
    if a.guest:
        return side_by_side(a)
    caps = probe()
    rows = []
    t0 = time.time()
    for bw in BWS:
        for d in DELAYS:
            with watch_host() as host:
                rows.append(measure(bw, d, a.pings, a.iperf_s))
            rows[-1].update(fidelity=host["verdict"], host_idle_min=host["idle_min"])
            r = rows[-1]
            print(f"bw {bw:>4} Mbit/s delay {d:>3} ms: RTT {r['rtt_ms']:7.2f} ms "
                  f"(cfg {r['rtt_cfg_ms']:5.1f})  goodput {r['goodput_mbit']:7.2f} Mbit/s "
                  f"ratio {r['goodput_ratio']:.3f}", flush=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"backend": caps.link_backend, "capabilities": caps.to_dict(),
                   "seconds": time.time() - t0, "rows": rows}, f, indent=2)
    print(f"\nbackend: {caps.link_backend}\n")
    print("| bw Mbit/s | delay ms | RTT cfg | RTT meas | RTT err ms | goodput | ratio | "
          "targets missed | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bw_mbit']} | {r['delay_ms']} | {r['rtt_cfg_ms']:.1f} | {r['rtt_ms']:.2f} "
              f"| {r['rtt_err_ms']:+.2f} | {r['goodput_mbit']:.2f} | {r['goodput_ratio']:.3f} "
              f"| {missed(r)} | {r['fidelity']} |")
    print(f"\nwritten: {a.out}")
    return 0


def missed(r: dict) -> str:
    """A grid row's targets not met."""
    return ", ".join(k for k, ok in (("RTT", r["rtt_ok"]), ("goodput", r["goodput_ok"]))
                     if not ok) or "none"


def side_by_side(a: argparse.Namespace) -> int:
    """The grid here, then in a guest (scripts/vm.sh run), one table of both."""
    results = os.path.join(ROOT, "benchmarks", "results")
    here_out = os.path.join(results, "link_fidelity_host.json")
    grid = [sys.executable, os.path.abspath(__file__), "--pings", str(a.pings),
            "--iperf-s", str(a.iperf_s)]
    if subprocess.run([*grid, "--out", here_out]).returncode != 0:
        return 1
    with tempfile.TemporaryDirectory(prefix="sledge-lf-") as tmp:
        inner = (f".venv/bin/python benchmarks/link_fidelity.py --pings {a.pings} "
                 f"--iperf-s {a.iperf_s} --out \"$SLEDGE_VM_OUT/guest.json\"")
        with watch_host() as host:  # the emulator's own load on this machine
            rc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "vm.sh"), "run", "--out",
                                 tmp, "--", "bash", "-c", inner]).returncode
        if rc != 0:
            print(f"the guest run failed (vm.sh exit code {rc}): docs/vm.md", file=sys.stderr)
            return rc
        with open(os.path.join(tmp, "guest.json")) as f:
            guest = json.load(f)
    guest["host_while_guest_ran"] = host
    with open(os.path.join(results, "link_fidelity_guest.json"), "w") as f:
        json.dump(guest, f, indent=2)
    with open(here_out) as f:
        here = json.load(f)
    print(f"\nleft: {here['backend']} on this machine; right: {guest['backend']} in a TCG guest "
          f"(this machine's idle CPU while it ran: min {host['idle_min']:.0%}, "
          f"verdict {host['verdict']})\n")
    print("| bw Mbit/s | delay ms | RTT cfg ms | RTT err ms (here / guest) | goodput ratio "
          "(here / guest) | targets missed (here / guest) | verdict (here / guest) |")
    print("|---|---|---|---|---|---|---|")
    for h, g in zip(here["rows"], guest["rows"], strict=True):
        print(f"| {h['bw_mbit']} | {h['delay_ms']} | {h['rtt_cfg_ms']:.1f} | "
              f"{h['rtt_err_ms']:+.2f} / {g['rtt_err_ms']:+.2f} | "
              f"{h['goodput_ratio']:.3f} / {g['goodput_ratio']:.3f} | "
              f"{missed(h)} / {missed(g)} | {h['fidelity']} / {g['fidelity']} |")
    print(f"\nwritten: {here_out}, {os.path.join(results, 'link_fidelity_guest.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
