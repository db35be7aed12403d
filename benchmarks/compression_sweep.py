#!/usr/bin/env python3
"""Compression sweep: bytes on the wire and accuracy per compression ratio (docs/compression.md).

Runs PSL on topologies/tiny.py (2 clients, smallcnn on digits, cut after conv2: d = 256 per
sample) once per codec setting, the same seeds, rounds and iterations, and reads per run: a
client's ACT and GRAD bytes from the protocol counters (and, over Mininet, its interface's tx
bytes), the codec's dense vs packed tensor bytes, the last round's train loss and the test
accuracy with the codec in the loop. Writes sweep.json and sweep.md to --out.

    .venv/bin/python benchmarks/compression_sweep.py --loopback [--rounds 3 --iters 20]
    sudo flock /tmp/sledge-mininet.lock .venv/bin/python benchmarks/compression_sweep.py
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

SETTINGS = [
    ("none", {}),
    ("quant 16 (fp16)", {"method": "quant", "bits": 16}),
    ("quant 8", {"method": "quant", "bits": 8}),
    ("quant 4", {"method": "quant", "bits": 4}),
    ("quant 2", {"method": "quant", "bits": 2}),
    ("c3sl R=2", {"method": "c3sl", "R": 2}),
    ("c3sl R=4", {"method": "c3sl", "R": 4}),
    ("c3sl R=8", {"method": "c3sl", "R": 8}),
    ("c3sl R=16", {"method": "c3sl", "R": 16}),
    ("topk 0.25", {"method": "topk", "rho": 0.25}),
    ("topk 0.1", {"method": "topk", "rho": 0.1}),
    ("topk 0.03", {"method": "topk", "rho": 0.03}),
]


def one(label: str, spec: dict, args: argparse.Namespace, out: str) -> dict:
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"))
    cfg = RunConfig.from_dict(dict(
        name="sweep", dataset="digits", rounds=args.rounds, iters_per_round=args.iters,
        batch_size=32, train_limit=None, test_limit=None, compression=spec, port=args.port,
        launcher="popen" if args.loopback else "zygote", out_dir=out, scheme=args.scheme))
    exp = Experiment(cfg, topo, topology="tiny", loopback=args.loopback)
    exp.run()
    rounds = read_rounds(exp.run_dir.path)
    c1 = [r["nodes"]["c1"] for r in rounds]
    row = {"setting": label, "compression": spec,
           "act_bytes": sum(n["by_type"]["ACT.tx"] for n in c1),
           "grad_bytes": sum(n["by_type"].get("GRAD.rx", 0) for n in c1),
           "train_loss": rounds[-1]["train_loss"], "test_acc": rounds[-1]["test_acc"],
           "fidelity": overall(r.get("fidelity") for r in rounds)["verdict"]}
    if not args.loopback:
        row["iface_tx_bytes"] = sum(r["interfaces"]["c1-eth0"]["tx_bytes"] for r in rounds)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loopback", action="store_true", help="no Mininet (protocol bytes only)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--scheme", default="psl")
    ap.add_argument("--port", type=int, default=20100)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "compression"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, spec in SETTINGS:
            rows.append(one(label, spec, args, tmp))
    base = rows[0]
    for r in rows:
        r["uplink_ratio"] = base["act_bytes"] / r["act_bytes"]
        r["downlink_ratio"] = base["grad_bytes"] / r["grad_bytes"]
        if "iface_tx_bytes" in r:
            r["iface_ratio"] = base["iface_tx_bytes"] / r["iface_tx_bytes"]
    with open(os.path.join(args.out, "sweep.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    iface = "iface_ratio" in base
    head = ("| setting | ACT bytes (c1) | uplink ÷ | GRAD bytes (c1) | downlink ÷ |"
            + (" iface tx ÷ |" if iface else "") + " train loss | test acc |")
    lines = [f"{args.scheme}, tiny.py 2 clients, smallcnn/digits cut conv2 (d=256), batch 32, "
             f"{args.rounds} rounds x {args.iters} iterations, "
             f"{'loopback' if args.loopback else 'Mininet'}", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['act_bytes']} | {r['uplink_ratio']:.2f} | "
                     f"{r['grad_bytes']} | {r['downlink_ratio']:.2f} |"
                     + (f" {r['iface_ratio']:.2f} |" if iface else "")
                     + f" {r['train_loss']:.3f} | {r['test_acc']:.3f} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "sweep.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
