"""A controller killed with SIGKILL leaves its /tmp paths; the next one removes them, and only
those (testbed.emu.owned)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from testbed.emu.owned import owned_tmpdir, sweep_orphans

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "topologies" / "tiny.py")


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_sweep_removes_only_paths_of_dead_owners():
    dead = tempfile.mkdtemp(prefix=f"sledge-ctl-{dead_pid()}-")
    mine = owned_tmpdir("ctl")  # sweeps first: `dead` goes
    stranger = tempfile.mkdtemp(prefix="sledge-notours")
    try:
        assert not os.path.exists(dead)
        assert os.path.isdir(mine) and os.path.isdir(stranger)
        assert sweep_orphans() == []  # our own (alive) and foreign names are left alone
    finally:
        shutil.rmtree(mine, ignore_errors=True)
        shutil.rmtree(stranger, ignore_errors=True)
        shutil.rmtree(dead, ignore_errors=True)


def test_a_sigkilled_controllers_paths_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "runs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed.cli", "run", TINY, "--loopback", "--dataset", "digits",
         "--rounds", "50", "--iters", "5", "--train-limit", "200", "--test-limit", "100",
         "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        pattern = f"/tmp/sledge-ctl-{proc.pid}-*"
        deadline = time.monotonic() + 120
        while not glob.glob(pattern) or not list(out.glob("*/rounds.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = glob.glob(pattern)
        assert left  # SIGKILL leaves the control dir: the case being fixed
        assert survivors(str(out)) == []  # its nodes died with it (PR_SET_PDEATHSIG)
        sweep_orphans()
        assert not any(os.path.exists(p) for p in left)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def survivors(run_root: str, timeout_s: float = 10.0) -> list[int]:
    """Processes started for runs under `run_root` still alive after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p.pid for p in psutil.process_iter(["cmdline"])
                 if run_root in " ".join(p.info["cmdline"] or [])]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
