#!/usr/bin/env python3
"""Framework tax: one PSL round over unshaped Mininet links vs the same work in one process.

ResNet-18 (CIFAR stem, 32x32, batch 32 per client), 2 clients, cut after `layer2.1`, on the
synthetic32 data set (CIFAR-shaped; the content does not matter for time). The networked round
is the second of two (the first pays one-off warm-up). The local baseline runs exactly PSL's
computation in one process - both client segments, the concatenated server step, the gradient
slices back - on batches of the same shape, after one warm-up iteration, with 1 and with 2
torch threads (each node uses 1). Target: networked / local <= 1.10.

    sudo .venv/bin/python benchmarks/framework_tax.py [--iters 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from nodes.models import build_model, split_model
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUT, BATCH, CLIENTS = "layer2.1", 32, 2
MODEL = {"name": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 32}


def networked(iters: int, out_dir: str) -> float:
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"),
                            params={"clients": CLIENTS, "bw": None, "delay": "0ms"})
    cfg = RunConfig(name="tax", dataset="synthetic32", model="resnet18", cuts=[CUT], rounds=2,
                    iters_per_round=iters, batch_size=BATCH, train_limit=None, evaluate=False,
                    launcher="zygote", out_dir=out_dir, momentum=0.9, lr=0.05)
    exp = Experiment(cfg, topo, topology="tiny")
    exp.run()
    return exp.rounds[-1]["wall_s"]


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results",
                                                  "framework_tax.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sledge-bench-") as tmp:
        net_s = networked(a.iters, tmp)
    local1, local2 = local(a.iters, 1), local(a.iters, 2)
    res = {"iters": a.iters, "batch": BATCH, "clients": CLIENTS, "cut": CUT,
           "networked_round_s": net_s, "local_1thread_s": local1, "local_2threads_s": local2,
           "ratio_vs_1thread": net_s / local1, "ratio_vs_2threads": net_s / local2}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print("\n| PSL round, ResNet-18 32x32, 2 clients x 32 | seconds | networked / this |")
    print("|---|---|---|")
    print(f"| over Mininet (unshaped links), {a.iters} iterations | {net_s:.2f} | 1.000 |")
    print(f"| one process, 1 torch thread | {local1:.2f} | {net_s / local1:.3f} |")
    print(f"| one process, 2 torch threads | {local2:.2f} | {net_s / local2:.3f} |")
    print(f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
