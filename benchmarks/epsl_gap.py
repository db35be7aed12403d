#!/usr/bin/env python3
"""EPSL's accuracy gap to PSL, per epsl_bp_mode, seed and round count (issue 16).

Runs PSL and EPSL (phi=1 by default) with each given epsl_bp_mode on topologies/tiny.py over
the loopback network (real node processes and ZeroMQ, no emulation: accuracy does not depend
on the links), one run at a time, with the library's defaults otherwise: Fashion-MNIST (6000
training, 2000 test samples), 5 IID clients, smallcnn cut after conv2 (--cut conv1: the
clients hold less), batch 32, SGD lr 0.05 and momentum 0.9, one local epoch a round (38
steps). Test accuracy is the run's own: the mean over the clients' models after each round.

Every run's accuracy per round is kept in the JSON file (--out); a run already there with at
least --rounds rounds is not run again, so seeds and modes can be added one call at a time.
Runs made with the command line can be adopted (--adopt LABEL SEED RUN_FOLDER). Then a table
for each --report round R: per label, over the seeds, the accuracy after round R, the mean of
rounds R-4..R (less noisy at a plateau), and the gap to PSL of the same seed.

What it does not do: no learning-rate decay (sledge has none), so "at convergence" here means
"after more rounds at the same step size"; no Mininet links; no other data set or model than
the defaults (the seed paper's 0.46 points is ResNet-18 on HAM10000).

    .venv/bin/python benchmarks/epsl_gap.py --labels psl last_layer --seeds 0 1 2 --rounds 60
    .venv/bin/python benchmarks/epsl_gap.py --labels psl last_layer --rounds 20 --cut conv1
    .venv/bin/python benchmarks/epsl_gap.py --report 20 60      # the tables only, no run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")
DEFAULT_OUT = os.path.join(ROOT, "benchmarks", "results", "epsl_gap.json")


def scheme_of(label: str, phi: float) -> tuple[str, dict[str, Any]]:
    """'psl' is PSL; any other label is an epsl_bp_mode at the given phi."""
    return ("psl", {}) if label == "psl" else ("epsl", {"phi": phi, "epsl_bp_mode": label})


def key(label: str, phi: float, seed: int, cut: str = "conv2") -> str:
    k = f"psl/seed{seed}" if label == "psl" else f"{label}/phi{phi:g}/seed{seed}"
    return k if cut == "conv2" else f"{k}/cut-{cut}"


def run_one(label: str, phi: float, seed: int, a: argparse.Namespace) -> dict[str, Any]:
    from testbed import Experiment
    from testbed.emu.topology import load_topology
    from testbed.plan.config import RunConfig

    scheme, options = scheme_of(label, phi)
    topo, _ = load_topology(TINY, params={"clients": a.clients})
    with tempfile.TemporaryDirectory(prefix="epsl_gap-") as out_dir:
        cfg = RunConfig.from_dict(dict(name=f"gap-{label}", scheme=scheme, rounds=a.rounds,
                                       seed=seed, out_dir=out_dir, scheme_options=options,
                                       cuts=[a.cut]))
        t0 = time.perf_counter()
        exp = Experiment(cfg, topo, topology=TINY, loopback=True, quiet=True)
        exp.run()
        return {"label": label, "scheme": scheme, "options": options, "seed": seed,
                "clients": a.clients, "cut": a.cut, "rounds": len(exp.rounds),
                "acc": [100.0 * r["test_acc"] for r in exp.rounds],
                "train_loss": [r["train_loss"] for r in exp.rounds],
                "wall_s": round(time.perf_counter() - t0, 1)}


def adopt(label: str, phi: float, seed: int, folder: str) -> dict[str, Any]:
    """A run made with `sledge run ... --loopback` (rounds.jsonl of its folder)."""
    with open(os.path.join(folder, "rounds.jsonl")) as f:
        rounds = [json.loads(line) for line in f if line.strip()]
    scheme, options = scheme_of(label, phi)
    return {"label": label, "scheme": scheme, "options": options, "seed": seed,
            "rounds": len(rounds), "acc": [100.0 * r["test_acc"] for r in rounds],
            "train_loss": [r["train_loss"] for r in rounds], "adopted": folder}


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.2f} ± {sd:.2f}"


def table(runs: dict[str, dict], phi: float, r: int, cut: str = "conv2") -> str:
    """Markdown: per label, seeds with at least r rounds, accuracy after round r, the mean of
    rounds r-4..r, and both gaps to PSL of the same seed (runs with this cut only)."""
    runs = {k: v for k, v in runs.items() if v.get("cut", "conv2") == cut}
    psl = {v["seed"]: v for v in runs.values() if v["label"] == "psl" and v["rounds"] >= r}
    labels = ["psl"] + sorted({v["label"] for v in runs.values() if v["label"] != "psl"})
    lines = [f"after round {r} (phi = {phi:g}, cut after {cut}; mean ± std over seeds)", "",
             f"| label | seeds | acc. | mean of rounds {max(1, r - 4)}-{r} | gap | "
             "gap (mean of 5) |", "| --- | --- | --- | --- | --- | --- |"]
    for label in labels:
        mine = sorted((v for v in runs.values() if v["label"] == label and v["rounds"] >= r
                       and (label == "psl" or v["options"].get("phi") == phi)),
                      key=lambda v: v["seed"])
        if not mine:
            continue
        acc = [v["acc"][r - 1] for v in mine]
        avg5 = [statistics.fmean(v["acc"][max(0, r - 5):r]) for v in mine]
        gap = [psl[v["seed"]]["acc"][r - 1] - v["acc"][r - 1] for v in mine if v["seed"] in psl]
        gap5 = [statistics.fmean(psl[v["seed"]]["acc"][max(0, r - 5):r]) - a5
                for v, a5 in zip(mine, avg5, strict=True) if v["seed"] in psl]
        seeds = " ".join(str(v["seed"]) for v in mine)
        lines.append(f"| {label} | {seeds} | {mean_std(acc)} | {mean_std(avg5)} | "
                     f"{'-' if label == 'psl' else mean_std(gap)} | "
                     f"{'-' if label == 'psl' else mean_std(gap5)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--labels", nargs="*", default=[],
                   help="psl and/or epsl_bp_mode names to run (none: only report)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--phi", type=float, default=1.0)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--cut", default="conv2", help="smallcnn unit the clients end with")
    p.add_argument("--report", nargs="*", type=int, default=None,
                   help="rounds to tabulate (default: 20 and --rounds)")
    p.add_argument("--adopt", nargs=3, action="append", default=[],
                   metavar=("LABEL", "SEED", "FOLDER"))
    p.add_argument("--out", default=DEFAULT_OUT)
    a = p.parse_args()

    runs: dict[str, dict] = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            runs = json.load(f)["runs"]

    def save() -> None:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"setup": "fashion-mnist 6000/2000, smallcnn cut conv2, batch 32, SGD "
                                "lr 0.05 momentum 0.9, one local epoch a round (38 steps), "
                                "tiny.py on loopback; acc: % per round, mean over clients",
                       "runs": runs}, f, indent=1)

    for label, seed, folder in a.adopt:
        runs[key(label, a.phi, int(seed))] = adopt(label, a.phi, int(seed), folder)
        save()
    for seed in a.seeds:
        for label in a.labels:
            k = key(label, a.phi, seed, a.cut)
            if k in runs and runs[k]["rounds"] >= a.rounds:
                continue
            print(f"running {k} for {a.rounds} rounds ...", file=sys.stderr, flush=True)
            runs[k] = run_one(label, a.phi, seed, a)
            print(f"  {k}: {runs[k]['acc'][-1]:.2f} % after round {runs[k]['rounds']} "
                  f"({runs[k]['wall_s']} s)", file=sys.stderr, flush=True)
            save()
    for r in a.report if a.report is not None else sorted({20, a.rounds}):
        print(table(runs, a.phi, r, a.cut) + "\n")


if __name__ == "__main__":
    main()
