"""A run says what it was made with and how long it really took (testbed.run.versions)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from testbed.run.versions import sledge_version
from tests.test_schemes_loopback import ROOT, loop_run


def test_version_flag_prints_the_installed_version():
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "--version"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f"sledge {sledge_version()}"
    assert sledge_version() != "unknown"


def test_config_records_versions_and_summary_the_runs_wall_time(tmp_path):
    exp, rounds = loop_run(tmp_path, "psl")
    config = json.loads((exp.run_dir.path / "config.json").read_text())
    summary = json.loads((exp.run_dir.path / "summary.json").read_text())
    v = config["versions"]
    assert v["torch"] == torch.__version__ and v["sledge"] == sledge_version()
    assert v["git"] is None or len(v["git"].removesuffix("-dirty")) == 40
    # The rounds are part of the run: the wall time covers them, start-up and evaluation.
    assert summary["wall_s"] > summary["startup_s"] > 0
    assert summary["wall_s"] > summary["startup_s"] + summary["total_s"]


def test_the_public_names_import_from_the_package_and_output_is_not_wrapped(tmp_path):
    import testbed
    from testbed import Experiment, RunConfig, RunFailed, load_topology

    assert Experiment.__module__ == "testbed.scenario.experiment" and callable(load_topology)
    assert RunConfig().scheme and issubclass(RunFailed, RuntimeError)
    assert sorted(testbed.__all__) == ["Experiment", "RunConfig", "RunFailed", "load_topology"]
    out = tmp_path / ("a-long-folder-name-" * 5)  # the results line passes 80 columns
    r = subprocess.run([sys.executable, "-m", "testbed.cli", "run", f"{ROOT}/topologies/tiny.py",
                        "--loopback", "--dataset", "digits", "--rounds", "1", "--iters", "1",
                        "--train-limit", "200", "--test-limit", "100", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stdout.splitlines() if x.startswith("results: ")]
    assert line.startswith(f"results: {out}/")
