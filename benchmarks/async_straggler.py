#!/usr/bin/env python3
"""Asynchronous SL vs synchronous PSL with a straggler (docs/compression.md).

topologies/tiny.py, 2 clients, c2 held to --cpu of the machine (the host's CPU quota); the same
round (iters x 2 client batches of server work) under PSL (concat: a barrier every step) and
async_sl with each staleness policy. Prints and writes (--out) per run: round wall time, server
updates per client, staleness histogram, dropped batches, train loss.

    sudo flock /tmp/sledge-mininet.lock .venv/bin/python benchmarks/async_straggler.py
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.fidelity import overall
from testbed.run.records import read_rounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = [("psl", {}), ("async_sl", {"staleness_policy": "none"}),
        ("async_sl", {"staleness_policy": "lr_decay"}),
        ("async_sl", {"staleness_policy": "bounded", "tau_max": 2})]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compression"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scheme, opts in RUNS:
            topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"))
            cfg = RunConfig.from_dict(dict(
                name="straggler", scheme=scheme, scheme_options=opts, dataset="digits",
                rounds=args.rounds, iters_per_round=args.iters, batch_size=32,
                train_limit=None, test_limit=None, launcher="zygote", cpu={"c2": args.cpu},
                out_dir=tmp))
            exp = Experiment(cfg, topo, topology="tiny")
            exp.run()
            rounds = read_rounds(exp.run_dir.path)
            srv = [r["nodes"]["srv"] for r in rounds]
            hist: dict[str, int] = {}
            for s in srv:
                for k, v in s.get("staleness_hist", {}).items():
                    hist[k] = hist.get(k, 0) + v
            ups: dict[str, int] = {}
            for s in srv:
                for k, v in s.get("updates_per_client", {}).items():
                    ups[k] = ups.get(k, 0) + v
            rows.append({"scheme": scheme, "options": opts,
                         "wall_s": [round(r["wall_s"], 2) for r in rounds],
                         "updates_per_client": ups, "staleness_hist": hist,
                         "dropped": sum(s.get("dropped", 0) for s in srv),
                         "train_loss": round(rounds[-1]["train_loss"], 3),
                         "test_acc": round(rounds[-1]["test_acc"], 3),
                         "fidelity": overall(r.get("fidelity") for r in rounds)["verdict"]})
            print(rows[-1])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "async_straggler.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
