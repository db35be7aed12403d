#!/usr/bin/env python3
"""Framework tax: one PSL round over unshaped Mininet links vs the same work in one process.

ResNet-18 (CIFAR stem, 32x32, batch 32 per client), 2 clients, cut after `layer2.1`, on the
synthetic32 data set (CIFAR-shaped; the content does not matter for time). The networked round
is the second of two (the first pays one-off warm-up). The local baseline runs exactly PSL's
computation in one process - both client segments, the concatenated server step, the gradient
slices back - on batches of the same shape, after one warm-up iteration, with 1 and with 2
torch threads (each node uses 1 unless devices.threads says otherwise). The networked round
runs as shipped and with the server on 2 threads (it steps while both clients wait on it).
Target (issue 15): networked / local with 2 threads <= 1.05.

    sudo .venv/bin/python benchmarks/framework_tax.py [--iters 3] [--reps 3] [--out FILE]
    .venv/bin/python benchmarks/framework_tax.py --loopback      # no Mininet, no root
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from nodes.models import build_model, split_model
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.fidelity import background, overall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUT, BATCH, CLIENTS = "layer2.1", 32, 2
MODEL = {"name": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 32}


def networked(iters: int, out_dir: str, loopback: bool = False, **changes: object) -> dict:
    """The second round's record (`wall_s`, per-node compute); `changes`: config fields."""
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"),
                            params={"clients": CLIENTS, "bw": None, "delay": "0ms"})
    cfg = RunConfig(name="tax", dataset="synthetic32", model="resnet18", cuts=[CUT], rounds=2,
                    iters_per_round=iters, batch_size=BATCH, train_limit=None, evaluate=False,
                    out_dir=out_dir, momentum=0.9, lr=0.05, **changes)
    exp = Experiment(cfg, topo, topology="tiny", loopback=loopback, quiet=True)
    exp.run()
    return exp.rounds[-1]


def local(iters: int, threads: int) -> float:
    torch.set_num_threads(threads)
    model = build_model(**MODEL, seed=0)
    client0, server = split_model(model, [CUT])
    clients = [copy.deepcopy(client0) for _ in range(CLIENTS)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in [*clients, server]]
    g = torch.Generator().manual_seed(0)

    def step() -> None:
        xs = [torch.randn(BATCH, 3, 32, 32, generator=g) for _ in clients]
        ys = [torch.randint(0, 10, (BATCH,), generator=g) for _ in clients]
        acts = [m(x) for m, x in zip(clients, xs, strict=True)]
        x = torch.cat([a.detach() for a in acts]).requires_grad_()
        out = server(x)
        loss = torch.stack([F.cross_entropy(o, y) for o, y in
                            zip(out.split(BATCH), ys, strict=True)]).mean()
        for o in opts:
            o.zero_grad()
        loss.backward()
        opts[-1].step()
        for a, gr, o in zip(acts, (x.grad * CLIENTS).split(BATCH), opts, strict=False):
            a.backward(gr)
            o.step()

    step()  # warm-up, as the networked round measured is the second
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - t0


VARIANTS: dict[str, dict[str, object]] = {
    # as shipped: one torch thread per node (results bit for bit the same on any machine)
    "networked": {},
    # the server's step runs while both clients wait on it: give it both cores
    "networked, server 2 threads": {"threads": {"server": 2}},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of every variant")
    ap.add_argument("--loopback", action="store_true",
                    help="nodes on 127.0.0.1, no Mininet (no root needed)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "framework_tax.json"))
    a = ap.parse_args()
    quiet_before = background()  # the rounds fill the cores: was anything else loading them?
    t0, load0 = time.time(), os.getloadavg()[0]
    times: dict[str, list[float]] = {}
    verdicts: list[dict] = []
    compute: dict[str, list[dict[str, float]]] = {}
    for rep in range(a.reps):  # variants interleaved: each ratio compares neighbours in time
        with tempfile.TemporaryDirectory(prefix="sledge-bench-") as tmp:
            for name, changes in VARIANTS.items():
                rec = networked(a.iters, tmp, a.loopback, **changes)
                times.setdefault(name, []).append(rec["wall_s"])
                verdicts.append(rec.get("fidelity"))
                compute.setdefault(name, []).append(
                    {n: v["compute_s"] for n, v in rec["nodes"].items()})
        times.setdefault("local, 2 threads", []).append(local(a.iters, 2))
        times.setdefault("local, 1 thread", []).append(local(a.iters, 1))
        print(f"repetition {rep + 1}/{a.reps}: " + ", ".join(
            f"{k} {v[-1]:.2f} s" for k, v in times.items()), file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = times["local, 2 threads"]
    ratios = {k: statistics.median(x / r for x, r in zip(v, ref, strict=True))
              for k, v in times.items()}
    res = {"iters": a.iters, "batch": BATCH, "clients": CLIENTS, "cut": CUT, "reps": a.reps,
           "network": "loopback" if a.loopback else "mininet, unshaped links",
           "round_s": times, "median_s": med, "ratio_vs_local_2threads": ratios,
           "node_compute_s": compute, "loadavg_start": load0,
           "loadavg_end": os.getloadavg()[0], "elapsed_s": time.time() - t0,
           "fidelity": {"background_before": quiet_before, "rounds": overall(verdicts)}}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    where = "127.0.0.1" if a.loopback else "Mininet (unshaped links)"
    print(f"\n| PSL round, ResNet-18 32x32, 2 clients x {BATCH}, {a.iters} iterations "
          f"| seconds (median of {a.reps}) | / local 2 threads |")
    print("|---|---|---|")
    for k in times:
        label = f"{k} over {where}" if k.startswith("networked") else k
        print(f"| {label} | {med[k]:.2f} | {ratios[k]:.3f} |")
    print(f"load average {load0:.2f} -> {res['loadavg_end']:.2f}; written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
