#!/usr/bin/env python3
"""Start-up: time to the first round of the README's default loopback run, per launcher.

Runs `sledge run topologies/tiny.py --loopback --dataset digits` (PSL, 2 clients and a server,
3 rounds) as a user would, in a fresh interpreter each time, and reads two times: `startup_s`
from the run's summary.json (from the run folder's creation, i.e. after the command has parsed
its arguments and checked the config, to every node's HELLO: the first round starts then) and
the whole command's wall time. Variants alternate within each repetition, so they share the
machine's load: the default launcher (zygote), `--launcher popen`, and with `--baseline REV`
the same command on the tree of a git revision (its own defaults). Target (issue 15):
start-up <= 3 s.

It does not measure Mininet set-up (namespaces, links, relays): loopback only, no root needed.

    .venv/bin/python benchmarks/startup.py [--reps 5] [--baseline REV] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from testbed.run.fidelity import background

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ["run", "topologies/tiny.py", "--loopback", "--dataset", "digits"]


def one(tree: str, out_dir: str, extra: list[str]) -> dict[str, float]:
    """One run of the command in `tree` (a checkout of the project); its two times."""
    before = set(os.listdir(out_dir))
    env = {**os.environ, "PYTHONPATH": tree}  # the tree's own code, nodes included
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "testbed.cli", *COMMAND, *extra, "--set",
                        f"run.out_dir={out_dir}"], cwd=tree, env=env, capture_output=True,
                       text=True, timeout=600)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"run failed in {tree}: {r.stderr[-2000:]}")
    (run,) = set(os.listdir(out_dir)) - before
    with open(os.path.join(out_dir, run, "summary.json")) as f:
        summary = json.load(f)
    return {"startup_s": summary["startup_s"], "command_s": wall,
            "mean_round_s": summary["mean_round_s"]}


def checkout(rev: str, dest: str) -> str:
    """The tree of `rev`, exported (not a worktree: nothing to clean up in the repository)."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev], capture_output=True,
                             check=True).stdout
    os.makedirs(dest)
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return dest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--baseline", metavar="REV", help="also run the tree of this git revision")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "startup.json"))
    a = ap.parse_args()
    quiet_before = background()  # was anything else loading the host?
    load0, t0 = os.getloadavg()[0], time.time()
    with tempfile.TemporaryDirectory(prefix="sledge-startup-") as tmp:
        out_dir = os.path.join(tmp, "runs")
        os.makedirs(out_dir)
        variants: dict[str, tuple[str, list[str]]] = {"default (zygote)": (ROOT, []),
                                                      "--launcher popen": (ROOT, ["--launcher",
                                                                                  "popen"])}
        if a.baseline:
            base = checkout(a.baseline, os.path.join(tmp, "baseline"))
            variants[f"{a.baseline} (its default)"] = (base, [])
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in variants}
        for rep in range(a.reps):
            order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
            for name in order:
                tree, extra = variants[name]
                runs[name].append(one(tree, out_dir, extra))
            print(f"repetition {rep + 1}/{a.reps}: " + ", ".join(
                f"{k} {v[-1]['startup_s']:.2f} s" for k, v in runs.items()), file=sys.stderr,
                flush=True)
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    res = {"command": "sledge " + " ".join(COMMAND), "reps": a.reps, "runs": runs,
           "median": med, "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
           "cpus": os.cpu_count(), "elapsed_s": time.time() - t0,
           "fidelity": {"background_before": quiet_before, "background_after": background()}}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n| `{res['command']}` | start-up s (median of {a.reps}) | whole command s | "
          "round s |")
    print("|---|---|---|---|")
    for k, m in med.items():
        print(f"| {k} | {m['startup_s']:.2f} | {m['command_s']:.2f} | {m['mean_round_s']:.2f} |")
    print(f"load average {load0:.2f} -> {res['loadavg_end']:.2f} on {res['cpus']} CPUs; "
          f"written: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
