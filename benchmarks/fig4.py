#!/usr/bin/env python3
"""Seed Fig. 4: test accuracy against rounds of FL, SL, SFL-V1, SFL-V2, PSL and EPSL (phi 0.5
and 1) with ResNet-18 (CIFAR stem) on Fashion-MNIST padded to 32x32, 5 IID clients.

Every scheme runs with every seed (default 0 1 2) on topologies/tiny.py, on the loopback
network by default (no emulation: accuracy against rounds does not depend on the links).
Each run trains --rounds rounds (one local epoch each: epoch_rounds); the plateau rule then
picks where it would have stopped:

    plateau: the first round r >= --patience + 1 at which the best accuracy of rounds
    1..r exceeds the best of rounds 1..r-patience by less than --min-delta points
    (no gain of min-delta in the last `patience` rounds); no plateau: the last round.

A run's "final" accuracy is the accuracy at its plateau round, "best" the best up to it, and
"rounds to target" the first round reaching --target (%). Rounds after the plateau do not
change rounds before it, so a fixed-length run measured this way equals a run stopped there.
Writes fig4.md (the table over seeds: mean +- std), fig4.csv (every run and round), fig4.json
and fig4.png (accuracy against rounds, mean over seeds with the min-max band) to --out, after
every run; --resume keeps the runs a json of the same configuration has and runs the rest.

    .venv/bin/python benchmarks/fig4.py --quick          # CI-sized smoke run
    .venv/bin/python benchmarks/fig4.py [--rounds 30] [--seeds 0 1 2] [--train-limit 6000]

The data set is this file's fashion32 loader (a data set given by import path, as a user's
own would be): Fashion-MNIST from its usual local folder, zero-padded by 2 pixels a side.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")
DATASET = f"{os.path.abspath(__file__)}:fashion32"
SCHEMES: list[tuple[str, str, dict[str, Any]]] = [
    ("FL", "fl", {}),
    ("SL", "sl", {}),
    ("SFL-V1", "sflv1", {}),
    ("SFL-V2", "sflv2", {}),
    ("PSL", "psl", {}),
    ("EPSL phi=0.5", "epsl", {"phi": 0.5}),
    ("EPSL phi=1", "epsl", {"phi": 1.0}),
]


POOL_ENV = "SLEDGE_FIG4_POOL"  # "TRAIN,TEST": load only that many of each split (--quick)


def fashion32(root: str | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Fashion-MNIST (standardised, as the built-in loader gives it) padded to 32x32 with the
    standardised value of a black pixel. Every node process loads it; with $SLEDGE_FIG4_POOL
    set (--quick) only a seeded subset of each split, which keeps start-up short."""
    from nodes.data import DATASETS, load_dataset

    spec = DATASETS["fashion-mnist"]
    black = (0.0 - spec.mean[0]) / spec.std[0]
    pool = [int(v) for v in os.environ[POOL_ENV].split(",")] if os.environ.get(POOL_ENV) \
        else [None, None]
    out = []
    for split, limit in zip(("train", "test"), pool, strict=True):
        d = load_dataset("fashion-mnist", split, root=root, limit=limit, seed=12345)
        out.append((F.pad(d.x, (2, 2, 2, 2), value=black), d.y))
    return tuple(out)


def plateau_round(acc: list[float], patience: int, min_delta: float) -> int | None:
    """The round (1-based) the plateau rule stops at (module doc), None if it never does."""
    for r in range(patience + 1, len(acc) + 1):
        if max(acc[:r]) - max(acc[:r - patience]) < min_delta:
            return r
    return None


def summarize_run(acc: list[float], a: argparse.Namespace) -> dict[str, Any]:
    stop = plateau_round(acc, a.patience, a.min_delta)
    end = stop or len(acc)
    hit = next((r + 1 for r, v in enumerate(acc) if v >= a.target), None)
    return {"plateau": stop, "final": acc[end - 1], "best": max(acc[:end]), "to_target": hit}


def seed_setup(n: int, batch: int, eta: float) -> Any:
    """The seed's Fig. 4 network and devices as the latency model's Setup (the defaults of
    docs/latency.md's worked example): n clients at 50..250 m computing at 0.1..0.5 GHz
    (evenly spaced), an equal share of 70 MHz each way (0.2 W up, 1 W down), the broadcast
    over the whole band at the worst client's SNR, a 7 GHz edge server."""
    from testbed.plan.latency import Client, Path, Setup, path_gain, shannon_rate

    step = [i / max(n - 1, 1) for i in range(n)]
    dist = [50 + 200 * x for x in step]
    clients = tuple(Client((0.1 + 0.4 * x) * 1e9,
                           Path(shannon_rate(70e6 / n, 0.2, path_gain(d))),
                           Path(shannon_rate(70e6 / n, 1.0, path_gain(d))))
                    for x, d in zip(step, dist, strict=True))
    bcast = Path(min(shannon_rate(70e6, 1.0, path_gain(d)) for d in dist))
    return Setup(clients, 7e9, batch=batch, eta=eta, bcast=bcast)


def modelled_round_s(scheme: str, options: dict[str, Any], a: argparse.Namespace,
                     profile: Any) -> float | None:
    """Seconds one round (one local epoch) takes on the seed's network by the latency model
    the scheme names (docs/latency.md); None for a scheme without one (FL). Every cost in
    it is proportional to the batch (the seed's links have no propagation delay), so the
    last partial batch of an epoch counts as its share of a full one."""
    from testbed.plan.latency import MODELS, model_of, sfl_aggregation

    try:
        name, params = model_of(scheme, options)
    except ValueError:
        return None
    setup, cut = seed_setup(a.clients, a.batch, a.eta), profile.cut(a.cut)
    iters = a.train_limit / a.clients / a.batch
    if name == "vanilla_sl":  # one round: every client's epoch in turn, hand-offs included
        return MODELS[name](profile, setup, [cut], **params, batches=iters)["total"]
    t = iters * MODELS[name](profile, setup, [cut], **params)["total"]
    if name in ("sflv1", "sflv2"):  # FedAvg once per round (one local epoch)
        t += sfl_aggregation(profile, setup, cut)
    return t


def seed_topology(a: argparse.Namespace, fed: bool) -> Any:
    """tiny.py's star with the seed's per-client rates (seed_setup's Shannon rates, each
    way) on the client links, for --network mininet."""
    from testbed.emu.topolib import Topo

    topo = Topo()
    s1 = topo.addSwitch("s1")
    topo.addLink(topo.addHost("srv", role="server"), s1)
    if fed:
        topo.addLink(topo.addHost("fed", role="fedserver"), s1)
    for i, c in enumerate(seed_setup(a.clients, a.batch, a.eta).clients, start=1):
        topo.addLink(topo.addHost(f"c{i}", role="client"), s1, delay="0ms",
                     bw_up=round(c.up.rate_bps / 1e6, 3),
                     bw_down=round(c.down.rate_bps / 1e6, 3))
    return topo


def run_one(scheme: str, options: dict[str, Any], seed: int, a: argparse.Namespace,
            out_dir: str) -> tuple[list[float], float, list[float]]:
    """Test accuracy (%) per round of one run, its wall time in seconds and each round's
    wall time (on Mininet: the emulated network's, with the modelled compute if asked)."""
    from testbed import Experiment
    from testbed.emu.topology import load_topology
    from testbed.plan.config import RunConfig

    fed = scheme in ("sflv1", "sflv2")
    mininet = a.network == "mininet"
    topo = seed_topology(a, fed) if mininet else \
        load_topology(TINY, params={"clients": a.clients, "fed": fed})[0]
    devices = {}
    if mininet and a.modelled_compute:
        setup = seed_setup(a.clients, a.batch, a.eta)
        devices = {"cycles": {"srv": setup.f_server, **{f"c{i}": c.f for i, c in
                                                        enumerate(setup.clients, start=1)}},
                   "flops_per_cycle": a.eta}
    cfg = RunConfig.from_dict(dict(
        name=f"fig4-{scheme}", scheme=scheme, dataset=DATASET, model="resnet18",
        cuts=[a.cut], rounds=a.rounds, batch_size=a.batch, lr=a.lr, momentum=a.momentum,
        train_limit=a.train_limit, test_limit=a.test_limit, seed=seed, out_dir=out_dir,
        scheme_options={**options, "epoch_rounds": True}, **devices))
    t0 = time.perf_counter()
    exp = Experiment(cfg, topo, topology=TINY if not mininet else "fig4-seed",
                     loopback=not mininet, quiet=True)
    exp.run()
    return ([100.0 * r["test_acc"] for r in exp.rounds], time.perf_counter() - t0,
            [r["wall_s"] for r in exp.rounds])


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "-"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.2f} ± {sd:.2f}"


def table(results: dict[str, dict[int, dict]], a: argparse.Namespace,
          round_s: dict[str, float | None]) -> list[str]:
    measured = " | measured latency to target (s)" if a.network == "mininet" else ""
    lines = [f"| scheme | final acc. (%) | best acc. (%) | rounds to {a.target:g} % "
             f"| plateau round | modelled s per round | modelled latency to target (s)"
             f"{measured} | wall time per run (s) |", "|---" * (8 + bool(measured)) + "|"]
    for label, runs in results.items():
        s = [r["summary"] for r in runs.values()]
        hits = [x["to_target"] for x in s if x["to_target"] is not None]
        to_target = (f"{statistics.fmean(hits):.1f} ({len(hits)}/{len(s)} runs)" if hits
                     else f"not reached (0/{len(s)})")
        plateaus = [x["plateau"] for x in s if x["plateau"] is not None]
        plat = (f"{statistics.fmean(plateaus):.1f} ({len(plateaus)}/{len(s)})" if plateaus
                else f"none in {a.rounds}")
        per = round_s.get(label)
        model = (f"{per:.1f}", mean_std([h * per for h in hits]) if hits else "-") \
            if per is not None else ("- (no model)", "-")
        cells = [label, mean_std([x["final"] for x in s]), mean_std([x["best"] for x in s]),
                 to_target, plat, *model]
        if measured:  # the emulated rounds' own wall times up to the target round
            cells.append(mean_std([sum(r["round_s"][:r["summary"]["to_target"]])
                                   for r in runs.values() if r["summary"]["to_target"]]))
        cells.append(f"{statistics.fmean(r['wall_s'] for r in runs.values()):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def epsl_gap(results: dict[str, dict[int, dict]]) -> str:
    psl, epsl = results.get("PSL"), results.get("EPSL phi=1")
    if not psl or not epsl:
        return ""
    gaps = [psl[s]["summary"]["final"] - epsl[s]["summary"]["final"] for s in psl if s in epsl]
    verdict = "within" if statistics.fmean(gaps) <= 0.5 else "not within"
    return (f"EPSL phi=1 vs PSL, final accuracy: PSL - EPSL = {mean_std(gaps)} points over "
            f"{len(gaps)} seed(s) (per seed: {', '.join(f'{g:+.2f}' for g in gaps)}): "
            f"{verdict} 0.5 points.")


def plot(results: dict[str, dict[int, dict]], path: str,
         round_s: dict[str, float | None]) -> None:
    """Accuracy against rounds (left) and against the modelled latency on the seed's
    network (right; schemes without a latency model are left out there)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (label, runs) in enumerate(results.items()):
        accs = [r["acc"] for r in runs.values()]
        n = min(len(x) for x in accs)
        rounds = list(range(1, n + 1))
        mean = [statistics.fmean(x[i] for x in accs) for i in range(n)]
        ax.plot(rounds, mean, marker="o", ms=3, label=label, color=f"C{i}")
        ax.fill_between(rounds, [min(x[i] for x in accs) for i in range(n)],
                        [max(x[i] for x in accs) for i in range(n)], alpha=0.15,
                        color=f"C{i}")
        if (per := round_s.get(label)) is not None:
            bx.plot([r * per / 3600 for r in rounds], mean, marker="o", ms=3, label=label,
                    color=f"C{i}")
    ax.set_xlabel("round (one local epoch)")
    bx.set_xlabel("modelled latency on the seed's network (h)")
    for x in (ax, bx):
        x.set_ylabel("test accuracy (%)")
        x.grid(alpha=0.3)
        if x.lines:  # the right panel is empty when only FL (no latency model) has run
            x.legend(fontsize=8)
    ax.set_title("ResNet-18 on Fashion-MNIST 32x32 (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI-sized smoke run: one seed, 2 rounds, 3 clients, 30 training and "
                        "30 test samples")
    p.add_argument("--rounds", type=int, default=30, help="most rounds per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--schemes", nargs="+", default=[s[0] for s in SCHEMES],
                   help="labels of the schemes to run (default: all seven)")
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--cut", default="layer1.1", help="ResNet-18 unit the client ends with")
    p.add_argument("--epsl-bp-mode", default=None,
                   help="EPSL's epsl_bp_mode (default: the scheme's; docs/schemes.md)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--train-limit", type=int, default=6000)
    p.add_argument("--test-limit", type=int, default=2000)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--min-delta", type=float, default=0.2, help="points")
    p.add_argument("--target", type=float, default=85.0, help="accuracy (%%) to reach")
    p.add_argument("--network", choices=("loopback", "mininet"), default="loopback",
                   help="mininet: a star with the seed's per-client rates on the client "
                        "links (needs root)")
    p.add_argument("--modelled-compute", action="store_true",
                   help="with --network mininet: nodes compute at the seed's device speeds "
                        "(0.1-0.5 GHz clients, 7 GHz server; slow: see docs/schemes.md)")
    p.add_argument("--eta", type=float, default=1.0,
                   help="FLOPs per cycle of the modelled devices (the latency model's eta)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in --out's fig4 json (same configuration) and "
                        "run only the missing ones: a long comparison can be split up")
    a = p.parse_args()
    if a.modelled_compute and a.network != "mininet":
        p.error("--modelled-compute needs --network mininet")
    if a.quick:
        a.rounds, a.seeds, a.clients, a.train_limit, a.test_limit = 2, [0], 3, 30, 30
        a.batch = 10
        os.environ[POOL_ENV] = "300,100"  # the node processes inherit it
        a.patience, a.target = 1, 20.0
    known = {s[0] for s in SCHEMES}
    if unknown := set(a.schemes) - known:
        p.error(f"unknown scheme label(s) {sorted(unknown)}; valid: {sorted(known)}")
    os.makedirs(a.out, exist_ok=True)
    name = ("fig4-quick" if a.quick else "fig4") + ("-mininet" if a.network == "mininet" else "")
    from testbed.plan.latency import Profile

    profile = Profile.of("resnet18", DATASET)
    round_s = {label: modelled_round_s(scheme, {**opts, **({"epsl_bp_mode": a.epsl_bp_mode}
                                                             if scheme == "epsl" and
                                                             a.epsl_bp_mode else {})},
                                       a, profile)
               for label, scheme, opts in SCHEMES if label in a.schemes}
    results: dict[str, dict[int, dict]] = {}
    earlier = 0.0  # wall time of the runs a --resume picks up
    path = os.path.join(a.out, f"{name}.json")
    if a.resume and os.path.exists(path):
        results, earlier = resumed(path, a)
        print(f"resuming {path}: {sum(map(len, results.values()))} run(s) done", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fig4-") as runs_dir:
        for label, scheme, options in SCHEMES:
            if label not in a.schemes:
                continue
            if scheme == "epsl" and a.epsl_bp_mode:
                options = {**options, "epsl_bp_mode": a.epsl_bp_mode}
            for seed in a.seeds:
                if seed in results.get(label, {}):
                    continue
                acc, wall, per_round = run_one(scheme, options, seed, a, runs_dir)
                results.setdefault(label, {})[seed] = {
                    "acc": acc, "wall_s": wall, "round_s": per_round,
                    "summary": summarize_run(acc, a)}
                print(f"{label:13s} seed {seed}: "
                      + " ".join(f"{x:.1f}" for x in acc) + f"  ({wall:.0f} s)", flush=True)
                # after every run, so that an interrupted comparison loses at most one run
                write(results, a, round_s, name, earlier + time.perf_counter() - t0)
    total = earlier + time.perf_counter() - t0
    lines, gap = write(results, a, round_s, name, total)
    print("\n".join(lines))
    if gap:
        print(gap)
    print(f"wrote {a.out}/{name}.{{md,csv,json,png}}; {total / 60:.1f} min of runs in all")


# what a run's numbers depend on: a --resume must not mix runs that differ in any of these
SAME_RUN = ("rounds", "clients", "cut", "epsl_bp_mode", "batch", "lr", "momentum",
            "train_limit", "test_limit", "network", "modelled_compute", "eta", "quick")


def resumed(path: str, a: argparse.Namespace) -> tuple[dict[str, dict[int, dict]], float]:
    """The runs an earlier invocation wrote to `path`, if it ran the same configuration
    (SAME_RUN); the plateau rule and target are re-applied to them, since they only read the
    accuracies."""
    with open(path) as f:
        old = json.load(f)
    was = old["args"]
    if diff := [f"{k}={was.get(k)!r}" for k in SAME_RUN if was.get(k) != getattr(a, k)]:
        print(f"fig4.py: --resume: {path} ran another configuration ({', '.join(diff)}); "
              "use another --out or drop --resume", file=sys.stderr)
        sys.exit(2)
    results = {label: {int(seed): {**r, "summary": summarize_run(r["acc"], a)}
                       for seed, r in runs.items()}
               for label, runs in old["results"].items()}
    return results, float(old["wall_s"])


def write(results: dict[str, dict[int, dict]], a: argparse.Namespace,
          round_s: dict[str, float | None], name: str, total: float) -> tuple[list[str], str]:
    """fig4.{md,csv,json,png} of the runs so far; returns the table's lines and the EPSL gap."""
    order = [label for label, _, _ in SCHEMES]  # a resumed file may hold them in another
    results = dict(sorted(results.items(), key=lambda kv: order.index(kv[0])))
    n = sum(map(len, results.values()))
    head = [f"# Fig. 4: accuracy against rounds ({'quick' if a.quick else 'full'})", "",
            f"ResNet-18 (CIFAR stem, cut after {a.cut}) on Fashion-MNIST padded to 32x32, "
            f"{a.clients} IID clients, {a.train_limit} training / {a.test_limit} test samples, "
            f"batch {a.batch}, SGD lr {a.lr} momentum {a.momentum}, one local epoch per round, "
            f"at most {a.rounds} rounds, seeds {a.seeds}, {a.network} network"
            f"{' with the seed devices modelled' if a.modelled_compute else ''}. Plateau "
            f"rule: no gain of {a.min_delta} points in {a.patience} rounds. Modelled latency: "
            f"the seed's network and devices (70 MHz, clients 0.1-0.5 GHz, server 7 GHz, "
            f"eta {a.eta:g}) by each scheme's latency model, times the rounds to the target. "
            f"{n} run(s), {total / 60:.1f} min of wall time in all.", ""]
    lines, gap = table(results, a, round_s), epsl_gap(results)
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write("\n".join(head + lines + ([""] + [gap] if gap else [])) + "\n")
    with open(os.path.join(a.out, f"{name}.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scheme", "seed", "round", "test_acc"])
        for label, runs in results.items():
            for seed, r in runs.items():
                w.writerows([label, seed, i + 1, f"{x:.2f}"] for i, x in enumerate(r["acc"]))
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump({"args": vars(a), "wall_s": total, "modelled_round_s": round_s,
                   "results": results}, f, indent=1)
    plot(results, os.path.join(a.out, f"{name}.png"), round_s)
    return lines, gap

if __name__ == "__main__":
    main()
