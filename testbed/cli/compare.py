"""`sledge compare`: run several schemes on the same topology, data, links and seed, then report.

Parses the command, checks every scheme's run before any starts, runs them one after another
(testbed.Experiment) and hands the run folders to testbed.report.compare for the table and plots.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodes.schemes import get_scheme
from testbed.cli.options import HETEROGENEITY, _add_device_args
from testbed.emu.topology import load_topology, parse_params
from testbed.errors import RunFailed
from testbed.plan.config import RunConfig
from testbed.report.compare import (
    DEFAULT_SCHEMES,
    DEFAULT_TOPOLOGY,
    ROOT,
    Spec,
    parse_spec,
    seed_speeds,
    write_outputs,
)
from testbed.run.preflight import check_out_dir
from testbed.run.records import console
from testbed.scenario.experiment import Experiment


@dataclass
class Comparison:
    out: Path
    rows: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def compare(a: argparse.Namespace) -> Comparison:
    specs = [parse_spec(s) for s in a.schemes or DEFAULT_SCHEMES]
    path = a.topology if os.path.exists(a.topology) else str(ROOT / a.topology)
    params = parse_params(a.topo_param, "-p")
    topo, topo_name = load_topology(path, a.topo, params)
    needs_fed = any("fedserver" in get_scheme(s.scheme, **s.options).roles for s in specs)
    takes_fed = "fed" in inspect.signature(type(topo).build).parameters
    if needs_fed and takes_fed and "fed" not in params:
        params["fed"] = True  # the same network for every scheme: the fed host idles in others
        topo, _ = load_topology(path, a.topo, params)
    device = {f: parse_params(getattr(a, f"{f}_items"), f"--{flag}")
              for f, flag in HETEROGENEITY.items()}
    if not a.no_modelled_compute:
        device["cycles"] = {**seed_speeds(topo), **device["cycles"]}
    common = dict(rounds=a.rounds, iters_per_round=a.iters_per_round, batch_size=a.batch_size,
                  lr=a.lr, momentum=a.momentum, dataset=a.dataset, train_limit=a.train_limit,
                  test_limit=a.test_limit, model=a.model, cuts=a.cuts or RunConfig().cuts,
                  seed=a.seed, launcher=a.launcher, flops_per_cycle=a.flops_per_cycle,
                  backward_flops_factor=a.backward_flops_factor, **device)
    RunConfig.from_dict({**common, "out_dir": a.out_dir})  # bad values fail before any run
    out = Path(a.out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-compare"
    runs = []  # every scheme's run checked (config, data, model, cuts) before any starts
    for spec in specs:
        topo, _ = load_topology(path, a.topo, params)  # fresh: a build changes its topology
        cfg = RunConfig.from_dict({**common, "name": spec.slug, "scheme": spec.scheme,
                                   "scheme_options": spec.options,
                                   "out_dir": str(out / "runs")})
        runs.append((spec, Experiment(cfg, topo, topology=path)))
    check_out_dir(a.out_dir)
    out.mkdir(parents=True, exist_ok=False)
    (out / "compare.json").write_text(json.dumps(
        {"topology": path, "topology_params": params, "schemes": [s.__dict__ for s in specs],
         "common": common}, indent=2, default=str))
    results: list[tuple[Spec, str | None, str | None]] = []
    t0 = time.perf_counter()
    for i, (spec, exp) in enumerate(runs, start=1):
        console.rule(f"[bold]{i}/{len(specs)}: {spec.label}")
        try:
            exp.run()
            results.append((spec, str(exp.run_dir.path), None))
        except RunFailed as e:
            print(f"sledge: compare: {spec.label} failed: {e}", file=sys.stderr)
            results.append((spec, str(exp.run_dir.path) if exp.run_dir else None, str(e)))
    took = time.perf_counter() - t0
    speeds = ", ".join(f"{k} {v / 1e9:g} GHz" for k, v in device["cycles"].items())
    limits = {k: device[k] for k in ("cpu", "mem_mb") if device[k]}
    header = (f"# Scheme comparison on {topo_name} ({os.path.relpath(path)}, "
              f"{params or 'defaults'})\n\n"
              f"{a.dataset}, {a.model} cut after {', '.join(common['cuts'])}, {a.rounds} rounds, "
              f"seed {a.seed}, {a.launcher} launcher; modelled compute: "
              f"{speeds + f' at {a.flops_per_cycle:g} FLOPs/cycle' if speeds else 'none'}"
              f"{f'; limits {limits}' if limits else ''}. All runs took {took:.0f} s.")
    rows = write_outputs(out, results, a.target_acc, header)
    console.print((out / "compare.md").read_text(), markup=False, soft_wrap=True)
    console.print(f"results: {out}")
    return Comparison(out, rows, [s.label for s, _, e in results if e])


def cmd_compare(a: argparse.Namespace) -> int:
    """Errors (bad input: exit 2, a failed run: 1, Ctrl-C: 130) are testbed.cli.main.main's."""
    return 1 if compare(a).failed else 0


def add_parser(sub: Any) -> None:
    """`sledge compare` on the CLI's subparsers."""
    d = RunConfig()
    p = sub.add_parser("compare", help="run several schemes on the same topology, data and "
                                       "seed; write a table and plots")
    p.add_argument("topology", nargs="?", default=DEFAULT_TOPOLOGY,
                   help=f"topology script (default {DEFAULT_TOPOLOGY})")
    p.add_argument("--topo", help="topology name inside the script (default: its first)")
    p.add_argument("-p", "--topo-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--schemes", nargs="+", action="extend", default=None,
                   metavar="SCHEME[:K=V,...]",
                   help=f"schemes to run (default: {' '.join(DEFAULT_SCHEMES)})")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", dest="iters_per_round", type=int, default=None,
                   help="iterations per round (default: one local epoch)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--train-limit", type=lambda s: None if s == "none" else int(s), default=None)
    p.add_argument("--test-limit", type=lambda s: None if s == "none" else int(s), default=None)
    p.add_argument("--model", default=d.model)
    p.add_argument("--cut", dest="cuts", action="append", help="cut point (repeatable)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--launcher", default="zygote", choices=["popen", "zygote"])
    p.add_argument("--out", dest="out_dir", default=d.out_dir)
    p.add_argument("--target-acc", type=float, default=0.8,
                   help="accuracy for the time-to-accuracy column (default 0.8)")
    _add_device_args(p)
    p.add_argument("--no-modelled-compute", action="store_true",
                   help="no cycles/s by default: compute as fast as this machine does")
    p.set_defaults(func=cmd_compare, flops_per_cycle=16.0)
