#!/usr/bin/env python3
"""Seed Fig. 6: user-edge-cloud vs user-edge vs user-cloud split learning over emulated links.

For each data-set size, three PSL runs on topologies/hierarchical.py (one edge, `--users` users,
the edge-cloud capacity `cec_ratio` of the users' aggregate access capacity):

    user-edge-cloud  cuts (l1, l2): users 1..l1, the edge a relay tier for l1+1..l2
                     (docs/multitier.md), the cloud the rest and the loss;
    user-edge        cut l1, the edge is the server (the cloud is unused);
    user-cloud       cut l1, the cloud is the server; the edge site only switches, so the l1
                     activations cross the slow edge-cloud link.

Compute is modelled from FLOPs at each host's `gcycles` tag (users 0.1 ... 0.5e9 cycles/s, edge
7e9, cloud 20e9; eta = --flops-per-cycle). A run trains one round, one local epoch over the
users' shards. Its measured wall time stands next to the analytic latency of algorithms.md 11.7
(T_hier per iteration, with one-way link delays added per crossing, times the iterations).
Writes fig6.md, fig6.csv, fig6.json and fig6.png to --out.

    sudo .venv/bin/python benchmarks/fig6.py [--sizes 240 480 960] [--users 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
from typing import Any

from nodes.models import build_model, cut_points
from testbed import Experiment
from testbed.emu.routing import graph_from_topo
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.plan.latency import Client, Path, Profile, Setup, hierarchical
from testbed.run.fidelity import overall

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HIER = os.path.join(ROOT, "topologies", "hierarchical.py")
CLEAN = {"loss": 0, "jitter": 0}  # deterministic links: the model has no loss or jitter
SPLITS = {  # name -> (hierarchical `server`, relay tiers, uses the second cut)
    "user-edge-cloud": ("cloud", ["edge"], True),
    "user-edge": ("edge", [], False),
    "user-cloud": ("cloud", [], False),
}


def topology(users: int, cec_ratio: float) -> Any:
    return lambda server: load_topology(HIER, params={
        "users": users, "edges": 1, "cec_ratio": cec_ratio, "server": server,
        "links": {"access": CLEAN, "edge_cloud": CLEAN}})[0]


def analytic(topo: Any, split: str, model: str, dataset: str, l1: str, l2: str, batch: int,
             eta: float, beta: float = 2.0) -> dict[str, float]:
    """algorithms.md 11.7 (testbed.plan.latency.hierarchical) for one iteration of PSL-style
    parallel users on this topology, in seconds: users' access links as declared, the
    edge-cloud link es1-cs1, cycles/s from each host's `gcycles` tag."""
    prof = Profile.of(model, dataset)
    i1 = prof.cut(l1)
    i2 = {"user-edge-cloud": prof.cut(l2), "user-edge": prof.units, "user-cloud": i1}[split]
    g = graph_from_topo(topo)
    users = [h for h in topo.hosts() if topo.nodeInfo(h).get("tier") == "user"]
    f = {h: topo.nodeInfo(h)["gcycles"] * 1e9 for h in topo.hosts()}

    def path(a: str, b: str) -> Path:
        return Path(g.edges[a, b]["bw"] * 1e6, g.edges[a, b]["delay"] / 1e3)

    clients = []
    for u in users:
        (sw,) = g.successors(u)
        clients.append(Client(f[u], path(u, sw), path(sw, u)))
    s = Setup(tuple(clients), f["edge1"], batch=batch, eta=eta, beta=beta)
    return hierarchical(prof, s, i1, i2, f["cloud"], path("es1", "cs1"), path("cs1", "es1"))


def measure(topo: Any, split: str, size: int, a: argparse.Namespace, out_dir: str) -> dict:
    server, tiers, two_cuts = SPLITS[split]
    cycles = {h: topo.nodeInfo(h)["gcycles"] * 1e9 for h in topo.hosts()}
    cfg = RunConfig.from_dict(dict(
        name=split, dataset=a.dataset, model=a.model, rounds=1, batch_size=a.batch,
        train_limit=size, test_limit=None, evaluate=False, cuts=[a.l1, a.l2] if two_cuts
        else [a.l1], tiers=tiers, cycles=cycles, flops_per_cycle=a.eta, out_dir=out_dir))
    exp = Experiment(cfg, topo, topology=HIER)
    exp.run()
    (rnd,) = exp.rounds
    return {"iters": rnd["iters"], "measured_s": rnd["wall_s"], "loss": rnd["train_loss"],
            "fidelity": overall([rnd.get("fidelity")])["verdict"]}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, split in enumerate(SPLITS):
        mine = [r for r in rows if r["split"] == split]
        sizes = [r["size"] for r in mine]
        ax.plot(sizes, [r["measured_s"] for r in mine], "o-", color=f"C{i}",
                label=f"{split} (measured)")
        ax.plot(sizes, [r["analytic_s"] for r in mine], "x--", color=f"C{i}",
                label=f"{split} (analytic 11.7)")
    ax.set_xlabel("training samples (one epoch)")
    ax.set_ylabel("training latency per epoch (s)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[240, 480, 960])
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--cec-ratio", type=float, default=1 / 20)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--model", default="smallcnn")
    p.add_argument("--l1", default="conv1")
    p.add_argument("--l2", default="conv2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--eta", type=float, default=1.0, help="FLOPs per cycle (11.2)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fig6"))
    a = p.parse_args()
    if a.l1 not in cut_points(build_model(a.model, num_classes=10)) or a.l1 == a.l2:
        p.error(f"--l1 {a.l1!r} / --l2 {a.l2!r}: two distinct cut points of {a.model}")
    os.makedirs(a.out, exist_ok=True)
    make = topology(a.users, a.cec_ratio)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fig6-") as runs:
        for size in a.sizes:
            for split in SPLITS:
                topo = make(SPLITS[split][0])
                t = analytic(topo, split, a.model, a.dataset, a.l1, a.l2, a.batch, a.eta)
                got = measure(topo, split, size, a, runs)
                rows.append({"size": size, "split": split, **got,
                             "analytic_s": got["iters"] * t["total"],
                             "analytic_iter": {k: round(v, 6) for k, v in t.items()}})
                r = rows[-1]
                print(f"{size:>6} {split:<16} {r['iters']:>4} it  measured {r['measured_s']:7.2f}"
                      f" s  analytic {r['analytic_s']:7.2f} s", flush=True)
    with open(os.path.join(a.out, "fig6.json"), "w") as fh:
        json.dump({"args": vars(a), "rows": rows}, fh, indent=1)
    cols = ["size", "split", "iters", "measured_s", "analytic_s"]
    with open(os.path.join(a.out, "fig6.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = ["| samples | split | iterations | measured (s) | analytic 11.7 (s) | ratio | "
             "fidelity |",
             "|---:|---|---:|---:|---:|---:|---|"]
    lines += [f"| {r['size']} | {r['split']} | {r['iters']} | {r['measured_s']:.2f} | "
              f"{r['analytic_s']:.2f} | {r['measured_s'] / r['analytic_s']:.2f} | "
              f"{r['fidelity']} |" for r in rows]
    with open(os.path.join(a.out, "fig6.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows, os.path.join(a.out, "fig6.png"))
    print(f"results: {a.out}")
    assert all(math.isfinite(r["analytic_s"]) for r in rows)


if __name__ == "__main__":
    main()
