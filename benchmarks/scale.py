#!/usr/bin/env python3
"""Scale: PSL with a small CNN and N clients behind one edge server, N in {10, 50, 100, 200}.

Per N: time to build the net and start the nodes, time of one PSL round, PSS per client node
idle (after start-up) and after training, and the zygote's own PSS. Side by side at N=10, the
same run with one interpreter per node (popen), so the launcher's saving is a ratio measured
in one run. Target: 200 clients, <= 25 MB PSS per idle client node.

    sudo .venv/bin/python benchmarks/scale.py [--sizes 10,50,100,200] [--out FILE]

With --shaped every client link is 20 Mbit/s, 10 ms (on a kernel without netem: a relay node per
link, served by the shared relay, one process per CPU). Memory per client is then all-in: the
client node's PSS plus its share of the link emulation (relay processes and relay nodes'
shells). Side by side at the first size, the same run with one relay process per link
(SLEDGE_RELAY_PROCESSES=0, the layout before the shared relay).

    sudo .venv/bin/python benchmarks/scale.py --shaped [--sizes 50,200,500,1000]

Also with --shaped: --no-baseline skips the one-relay-per-link run (at 1000 clients it would
not fit in memory here), --ipv6-baseline adds a run at the first size with the hosts' IPv6 on
(the start-up flood it causes, side by side), and --append keeps the out file's other sizes,
so one large size can be measured on its own:

    sudo .venv/bin/python benchmarks/scale.py --shaped --sizes 1000 --no-baseline --append

The round's relay traffic is measured apart from start-up's (relay_gbit_startup).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time

import psutil

from testbed import Experiment
from testbed.emu.links import RELAY_PROCESSES_ENV
from testbed.emu.network import IPv4Host
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MB = 1024 * 1024


def pss_mb(pids: list[int], kind: str = "pss") -> list[float]:
    """PSS (shared pages divided among their sharers) or USS (pages only this process has)."""
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            out.append(getattr(psutil.Process(pid).memory_full_info(), kind) / MB)
    return out


def relay_pids(exp: Experiment) -> tuple[list[int], list[int]]:
    """(relay processes, relay nodes' shells) of a relay-backed network; empty on netem."""
    links = exp.network.links
    if links.name != "relay":
        return [], []
    procs = sorted({p.pid for p in links.procs.values()})
    return procs, [exp.network.net.get(x).pid for x in links.relays.values()]


def relayed_gbit(exp: Experiment) -> float:
    """Gbit the relays have forwarded since they started, both directions of every link."""
    st = exp.network.links.stats()
    return sum(s[d]["bytes"] for s in st.values() for d in ("up", "down")) * 8 / 1e9


def run(n: int, launcher: str, out_dir: str, shaped: bool = False,
        relay_processes: str | None = None, ipv6: bool = False) -> dict:
    params = {"clients": n, "bw": 20, "delay": "10ms"} if shaped else \
        {"clients": n, "bw": None, "delay": "0ms"}
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"), params=params)
    if relay_processes is None:
        os.environ.pop(RELAY_PROCESSES_ENV, None)
    else:
        os.environ[RELAY_PROCESSES_ENV] = relay_processes
    cfg = RunConfig(name=f"scale{n}-{launcher}", dataset="digits", model="smallcnn",
                    cuts=["conv2"], rounds=1, iters_per_round=3, batch_size=8, train_limit=None,
                    evaluate=False, launcher=launcher, out_dir=out_dir, step_timeout_s=300,
                    start_timeout_s=1800)
    IPv4Host.ipv6 = ipv6  # hosts' IPv6 off, as sledge runs them; on: the side-by-side row
    res: dict = {"clients": n, "launcher": launcher, "shaped": shaped,
                 "relay_layout": ("per-link" if relay_processes == "0" else "shared")
                 + (", IPv6 on" if ipv6 else "")}
    t0 = time.perf_counter()

    def clients(exp: Experiment) -> list[int]:
        return [p.pid for name, p in exp.procs.items() if name != "srv"]

    def ready(exp: Experiment) -> None:
        res["startup_s"] = time.perf_counter() - t0
        idle = pss_mb(clients(exp))
        res["idle_pss_mb_median"] = statistics.median(idle)
        res["idle_pss_mb_total"] = sum(idle)
        res["idle_uss_mb_median"] = statistics.median(pss_mb(clients(exp), "uss"))
        if launcher == "zygote":
            res["zygote_pss_mb"] = pss_mb([exp.launcher.proc.pid])[0]
        relays, shells = relay_pids(exp)
        res["relay_processes"] = len(relays)
        res["relay_pss_mb_total"] = sum(pss_mb(relays))
        res["relay_node_shell_pss_mb_total"] = sum(pss_mb(shells))
        res["link_emulation_mb_per_client"] = \
            (res["relay_pss_mb_total"] + res["relay_node_shell_pss_mb_total"]) / n
        res["all_in_idle_mb_per_client"] = (res["idle_pss_mb_total"]
                                            + res.get("zygote_pss_mb", 0)) / n \
            + res["link_emulation_mb_per_client"]
        res["_relay_cpu0"] = sum(psutil.Process(p).cpu_times().user
                                 + psutil.Process(p).cpu_times().system for p in relays)
        # What the relays forwarded before round 1 (ARP, and IPv6's multicast when on).
        res["relay_gbit_startup"] = relayed_gbit(exp) if relays else 0.0

    def after(exp: Experiment, rnd: int) -> None:
        trained = pss_mb(clients(exp))
        res["trained_pss_mb_median"] = statistics.median(trained)
        res["trained_pss_mb_total"] = sum(trained)
        relays, _ = relay_pids(exp)
        if relays:
            cpu = sum(psutil.Process(p).cpu_times().user + psutil.Process(p).cpu_times().system
                      for p in relays)
            gbit = relayed_gbit(exp) - res["relay_gbit_startup"]  # the round's alone
            res["relay_cpu_s"] = cpu - res.pop("_relay_cpu0")
            res["relay_gbit_forwarded"] = gbit
            res["relay_cpu_s_per_gbit"] = res["relay_cpu_s"] / gbit if gbit else None

    summary = Experiment(cfg, topo, topology="tiny", on_ready=ready, on_round=after).run()
    res.pop("_relay_cpu0", None)
    res["round_s"] = summary["mean_round_s"]
    res["fidelity"] = summary.get("fidelity")  # rounds by verdict (docs/link-emulation.md)
    res["total_s"] = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=None, help="client counts (default 10,50,100,200; "
                                                  "with --shaped 50,200,500,1000)")
    ap.add_argument("--shaped", action="store_true", help="every client link 20 Mbit/s, 10 ms")
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-baseline", action="store_true",
                    help="--shaped: skip the one-relay-per-link run at the first size")
    ap.add_argument("--ipv6-baseline", action="store_true",
                    help="--shaped: at the first size also run with the hosts' IPv6 on (as "
                         "before sledge turned it off), side by side")
    ap.add_argument("--append", action="store_true",
                    help="--shaped: keep the out file's rows, replacing those measured again")
    a = ap.parse_args()
    sizes = [int(s) for s in (a.sizes or ("50,200,500,1000" if a.shaped
                                          else "10,50,100,200")).split(",")]
    out = a.out or os.path.join(ROOT, "benchmarks", "results",
                                "scale_shaped.json" if a.shaped else "scale.json")
    if a.shaped:
        return shaped_main(sizes, out, baseline=not a.no_baseline, append=a.append,
                           ipv6_baseline=a.ipv6_baseline)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sledge-bench-") as tmp:
        rows.append(run(10, "popen", tmp))
        for n in sizes:
            rows.append(run(n, "zygote", tmp))
            print(json.dumps(rows[-1]), flush=True)
    popen10 = rows[0]
    zyg10 = next((r for r in rows[1:] if r["clients"] == 10), None)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    print("\n| clients | launcher | start-up s | round s | idle PSS/client MB | "
          "idle USS/client MB | trained PSS/client MB | all clients idle MB | zygote MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['launcher']} | {r['startup_s']:.1f} | {r['round_s']:.2f} | "
              f"{r['idle_pss_mb_median']:.1f} | {r['idle_uss_mb_median']:.1f} | "
              f"{r['trained_pss_mb_median']:.1f} | "
              f"{r['idle_pss_mb_total']:.0f} | {r.get('zygote_pss_mb', 0):.0f} |")
    if zyg10:
        print(f"\nidle PSS per client, zygote / popen at 10 clients: "
              f"{zyg10['idle_pss_mb_median'] / popen10['idle_pss_mb_median']:.3f}")
        print(f"start-up time, zygote / popen at 10 clients: "
              f"{zyg10['startup_s'] / popen10['startup_s']:.3f}")
    print(f"written: {out}")
    return 0


def shaped_main(sizes: list[int], out: str, baseline: bool = True, append: bool = False,
                ipv6_baseline: bool = False) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="sledge-bench-") as tmp:
        if ipv6_baseline:
            rows.append(run(sizes[0], "zygote", tmp, shaped=True, ipv6=True))
            print(json.dumps(rows[-1]), flush=True)
        if baseline:  # side by side at the first size: one relay process per link, as before
            rows.append(run(sizes[0], "zygote", tmp, shaped=True, relay_processes="0"))
            print(json.dumps(rows[-1]), flush=True)
        for n in sizes:
            try:
                rows.append(run(n, "zygote", tmp, shaped=True))
            except Exception as e:  # record how far it got, and why it stopped
                rows.append({"clients": n, "shaped": True, "relay_layout": "shared",
                             "error": repr(e)[:500]})
                print(json.dumps(rows[-1]), flush=True)
                break
            print(json.dumps(rows[-1]), flush=True)
    if append and os.path.exists(out):
        with open(out) as f:
            old = json.load(f)["rows"]
        key = {(r["clients"], r["relay_layout"]) for r in rows}
        rows = [r for r in old if (r["clients"], r["relay_layout"]) not in key] + rows
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"rows": rows}, f, indent=2)
    print("\n| clients | relay layout | relay procs | start-up s | round s | client PSS MB | "
          "link emulation MB/client | all-in MB/client | relay CPU s/Gbit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['clients']} | {r['relay_layout']} | failed: {r['error'][:80]} |")
            continue
        cpg = r.get("relay_cpu_s_per_gbit")
        print(f"| {r['clients']} | {r['relay_layout']} | {r['relay_processes']} | "
              f"{r['startup_s']:.1f} | {r['round_s']:.2f} | {r['idle_pss_mb_median']:.1f} | "
              f"{r['link_emulation_mb_per_client']:.2f} | {r['all_in_idle_mb_per_client']:.1f} | "
              f"{cpg if cpg is None else round(cpg, 1)} |")
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
