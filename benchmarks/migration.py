#!/usr/bin/env python3
"""Model migration on handover: time and bytes against the state size and the backhaul.

For each model and backhaul capacity, a PSL run on topologies/cellular.py with two cells and an
edge server per cell (edges=per-cell, one UE per cell, clean links: no loss, no jitter), SGD
with momentum; after round 1, ue1 hands over to cell 2 and the server follows it
(testbed.scenario.migration.handover, follow=ue1): e1's segments' weights and momentum cross
e1 - bs1 - agg1 - bs2 - e2. Reported: the state's bytes, the STATE message's bytes, the bytes
on the first backhaul hop's interface, the transfer time beside the time the bytes need at the
backhaul's rate (the lower bound), the repoint time and the whole migration (start of the node
on the new edge included; the zygote launcher forks it warm). Writes migration.md and
migration.json to --out.

    sudo .venv/bin/python benchmarks/migration.py [--models smallcnn resnet18] \
        [--backhaul 1000 100] [--launcher zygote] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from typing import Any

from nodes.models import build_model, cut_points
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.fidelity import overall
from testbed.scenario import migration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CELLULAR = os.path.join(ROOT, "topologies", "cellular.py")


def one(model: str, backhaul_mbit: float, launcher: str, out: str, port: int) -> dict[str, Any]:
    clean = {"loss": 0, "jitter": 0}
    topo, _ = load_topology(CELLULAR, params={
        "cells": 2, "ues": 1, "edges": "per-cell",
        "links": {"backhaul": {"bw": backhaul_mbit, **clean}, "cell": clean}})
    cut = cut_points(build_model(model, in_channels=1, image_size=8, num_classes=10))[0]
    cfg = RunConfig.from_dict(dict(
        name=f"mig-{model}-{backhaul_mbit:g}", dataset="digits", model=model, cuts=[cut],
        scheme="psl", rounds=2, iters_per_round=5, batch_size=32, lr=0.05, momentum=0.9,
        launcher=launcher, port=port, out_dir=out, evaluate=False))
    got: dict[str, Any] = {}

    def on_round(exp: Experiment, rnd: int) -> None:
        if rnd == 1:
            got["events"] = migration.handover(exp, "ue1", 2, rnd + 1, follow="ue1")

    exp = Experiment(cfg, topo, topology="cellular", on_round=on_round)
    exp.run()
    ev = got["events"][-1]
    first = ev["backhaul"]["bs1->agg1"]["tx_bytes"]
    return {"model": model, "cut": cut, "backhaul_mbit": backhaul_mbit,
            "state_bytes": ev["state_bytes"], "message_bytes": ev["bytes"],
            "backhaul_bytes": first, "transfer_s": ev["transfer_s"],
            "at_rate_s": ev["bytes"] * 8 / (backhaul_mbit * 1e6),
            "repoint_s": ev["repoint_s"], "start_s": ev["start_s"], "total_s": ev["time_s"],
            "hash": ev["hash"], "run": str(exp.run_dir.path),  # migrate() checked both ends
            "fidelity": overall(r.get("fidelity") for r in exp.rounds)["verdict"]}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| model (cut) | backhaul | state | STATE msg | on bs1->agg1 | transfer | "
            "bytes at rate | repoint | node start | whole | fidelity |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['model']} ({r['cut']}) | {r['backhaul_mbit']:g} Mbit/s | "
            f"{r['state_bytes'] / 1e6:.2f} MB | {r['message_bytes'] / 1e6:.2f} MB | "
            f"{r['backhaul_bytes'] / 1e6:.2f} MB | {r['transfer_s']:.3f} s | "
            f"{r['at_rate_s']:.3f} s | {r['repoint_s']:.3f} s | {r['start_s']:.3f} s | "
            f"{r['total_s']:.3f} s | {r['fidelity']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smallcnn", "resnet18"])
    ap.add_argument("--backhaul", nargs="+", type=float, default=[1000, 100])
    ap.add_argument("--launcher", default="zygote", choices=("popen", "zygote"))
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "migration"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    runs = tempfile.mkdtemp(prefix="sledge-migration-bench-")
    rows = [one(m, bw, a.launcher, runs, a.port) for m in a.models for bw in a.backhaul]
    with open(os.path.join(a.out, "migration.json"), "w") as f:
        json.dump(rows, f, indent=1)
    md = table(rows)
    with open(os.path.join(a.out, "migration.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
