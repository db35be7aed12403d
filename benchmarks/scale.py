#!/usr/bin/env python3
"""Scale: PSL with a small CNN and N clients behind one edge server, N in {10, 50, 100, 200}.

Per N: time to build the net and start the nodes, time of one PSL round, PSS per client node
idle (after start-up) and after training, and the zygote's own PSS. Side by side at N=10, the
same run with one interpreter per node (popen), so the launcher's saving is a ratio measured
in one run. Target: 200 clients, <= 25 MB PSS per idle client node.

    sudo .venv/bin/python benchmarks/scale.py [--sizes 10,50,100,200] [--out FILE]
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


def run(n: int, launcher: str, out_dir: str) -> dict:
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"),
                            params={"clients": n, "bw": None, "delay": "0ms"})
    cfg = RunConfig(name=f"scale{n}-{launcher}", dataset="digits", model="smallcnn",
                    cuts=["conv2"], rounds=1, iters_per_round=3, batch_size=8, train_limit=None,
                    evaluate=False, launcher=launcher, out_dir=out_dir, step_timeout_s=300,
                    start_timeout_s=600)
    res: dict = {"clients": n, "launcher": launcher}
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

    def after(exp: Experiment, rnd: int) -> None:
        trained = pss_mb(clients(exp))
        res["trained_pss_mb_median"] = statistics.median(trained)
        res["trained_pss_mb_total"] = sum(trained)

    summary = Experiment(cfg, topo, topology="tiny", on_ready=ready, on_round=after).run()
    res["round_s"] = summary["mean_round_s"]
    res["total_s"] = time.perf_counter() - t0
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10,50,100,200")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scale.json"))
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sledge-bench-") as tmp:
        rows.append(run(10, "popen", tmp))
        for n in (int(s) for s in a.sizes.split(",")):
            rows.append(run(n, "zygote", tmp))
            print(json.dumps(rows[-1]), flush=True)
    popen10 = rows[0]
    zyg10 = next((r for r in rows[1:] if r["clients"] == 10), None)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
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
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
