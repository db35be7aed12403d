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
from testbed.cli.options import add_run_options, overrides
from testbed.emu.topology import parse_params
from testbed.errors import ConfigError, RunFailed
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
from testbed.scenario.spec import from_script, prepare, read


@dataclass
class Comparison:
    out: Path
    rows: list[dict] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


# compare's own defaults where they differ from `sledge run`'s: short runs of a small data set,
# every sample used.
DEFAULTS = {"run.rounds": 5, "data.dataset": "digits", "data.train_limit": None,
            "data.test_limit": None}


def compare(a: argparse.Namespace) -> Comparison:
    specs = [parse_spec(s) for s in a.schemes or DEFAULT_SCHEMES]
    experiment = a.experiment if os.path.exists(a.experiment) else str(ROOT / a.experiment)
    if experiment.endswith((".yaml", ".yml")):
        spec = read(experiment)
        spec.setdefault("topology", {})
    else:
        spec = from_script(experiment, a.topo, None, a.loopback)
    topo_ref = spec["topology"] if isinstance(spec["topology"], dict) else {
        "script": spec["topology"]}
    params = {**(topo_ref.get("params") or {}), **parse_params(a.topo_param, "-p")}
    if a.topo:
        topo_ref["name"] = a.topo
    if a.loopback:
        spec["loopback"] = True
    given = overrides(a)  # every run option, as `sledge run` takes them
    if any(k.partition(".")[0] in ("scheme", "scheme_options") for k in given):
        raise ConfigError("compare: the schemes are --schemes NAME:K=V ...; --scheme and -o "
                          "are `sledge run`'s")
    base = {k: v for k, v in DEFAULTS.items()
            if not (isinstance(spec.get(k.split(".")[0]), dict)
                    and k.split(".")[1] in spec[k.split(".")[0]])}
    spec["topology"] = {**topo_ref, "params": params}
    first = prepare(spec, {**base, **given})
    needs_fed = any("fedserver" in get_scheme(s.scheme, **s.options).roles for s in specs)
    takes_fed = "fed" in inspect.signature(type(first.topo).build).parameters
    if needs_fed and takes_fed and "fed" not in params:
        params["fed"] = True  # the same network for every scheme: the fed host idles in others
        spec["topology"]["params"] = params
        first = prepare(spec, {**base, **given})
    cycles = dict(first.cfg.devices.cycles)
    if not a.no_modelled_compute:
        cycles = {**seed_speeds(first.topo), **cycles}
    common = {**base, **given, "devices.cycles": cycles}
    out = Path(first.cfg.run.out_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-compare"
    runs = []  # every scheme's run checked (config, data, model, cuts) before any starts
    for s in specs:  # a fresh topology each: a build changes its topology
        p = prepare(spec, {**common, "scheme.name": s.scheme, "scheme.options": s.options,
                           "run.name": s.slug, "run.out_dir": str(out / "runs")})
        runs.append((s, Experiment(p.cfg, p.topo, **p.kwargs)))
    cfg = runs[0][1].cfg if runs else first.cfg
    check_out_dir(first.cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=False)
    (out / "compare.json").write_text(json.dumps(
        {"topology": topo_ref["script"], "topology_params": params,
         "schemes": [s.__dict__ for s in specs], "common": common,
         "config": {k: v for k, v in cfg.to_dict().items() if k != "scheme"}},
        indent=2, default=str))
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
    dev = cfg.devices
    speeds = ", ".join(f"{k} {v / 1e9:g} GHz" for k, v in dev.cycles.items())
    limits = {k: getattr(dev, k) for k in ("cpu", "mem_mb") if getattr(dev, k)}
    extras = {k: v for k, v in (("compression", cfg.efficiency.compression),
                                ("selection", cfg.efficiency.selection)) if v}
    header = (f"# Scheme comparison on {first.topo_name} "
              f"({os.path.relpath(topo_ref['script'])}, {params or 'defaults'})\n\n"
              f"{cfg.data.dataset}, {cfg.model.name} cut after {', '.join(cfg.model.cuts)}, "
              f"{cfg.run.rounds} rounds, seed {cfg.run.seed}, {cfg.run.launcher} launcher; "
              f"modelled compute: "
              f"{speeds + f' at {dev.flops_per_cycle:g} FLOPs/cycle' if speeds else 'none'}"
              f"{f'; limits {limits}' if limits else ''}"
              f"{f'; {extras}' if extras else ''}. All runs took {took:.0f} s.")
    rows = write_outputs(out, results, a.target_acc, header)
    console.print((out / "compare.md").read_text(), markup=False, soft_wrap=True)
    console.print(f"results: {out}")
    return Comparison(out, rows, [s.label for s, _, e in results if e])


def cmd_compare(a: argparse.Namespace) -> int:
    """Errors (bad input: exit 2, a failed run: 1, Ctrl-C: 130) are testbed.cli.main.main's."""
    return 1 if compare(a).failed else 0


def add_parser(sub: Any) -> None:
    """`sledge compare` on the CLI's subparsers."""
    defaults = ", ".join(f"{k}={v}" for k, v in DEFAULTS.items())
    p = sub.add_parser("compare", help="run several schemes on the same topology, data and "
                                       "seed; write a table and plots",
                       description="Run several schemes on one experiment (same topology, "
                       "data, links and seed) and write a table and plots. Every option of "
                       f"`sledge run` applies to every scheme. Defaults differing from `sledge "
                       f"run`'s: {defaults}; modelled compute at the seed's device speeds.")
    add_run_options(p, default_experiment=DEFAULT_TOPOLOGY)
    p.add_argument("--schemes", nargs="+", action="extend", default=None,
                   metavar="SCHEME[:K=V,...]",
                   help=f"schemes to run (default: {' '.join(DEFAULT_SCHEMES)})")
    p.add_argument("--target-acc", type=float, default=0.8,
                   help="accuracy for the time-to-accuracy column (default 0.8)")
    p.add_argument("--no-modelled-compute", action="store_true",
                   help="no cycles/s by default: compute as fast as this machine does")
    p.set_defaults(func=cmd_compare)
