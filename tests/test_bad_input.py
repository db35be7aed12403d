"""Every bad input through the real command line: exit code, one line on stderr naming the field or
file, no traceback, nothing left behind.

Each case runs `python -m testbed.cli` in a subprocess, as a user would, and fails before any
node starts (validation is up front), so a case takes the time of an interpreter start. The
resume cases need a run folder: one loopback run stopped after its first round (module fixture).
The disk-full and unwritable cases mount a tiny tmpfs of their own (root only) and unmount it.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "topologies" / "tiny.py")
FAST = ["--loopback", "--dataset", "digits", "--rounds", "1", "--iters", "1",
        "--train-limit", "200", "--test-limit", "100"]

SCRIPTS = {
    "syntax.py": "from testbed.emu.topolib import Topo\nclass T(Topo)\n    pass\n",
    "raises.py": "import os\nraise RuntimeError('broken on import')\n",
    "build.py": ("from testbed.emu.topolib import Topo\n\nclass T(Topo):\n    def build(self):\n"
                 "        raise ValueError('broken build')\n\nTOPOS = {'t': T}\n"),
    "events.yaml": "events:\n  - {at: 1, type: nope}\n",
}


def sledge(*args: str, cwd: Path = ROOT, env: dict | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_clean_line(stderr: str) -> str:
    """The checks every bad input must pass: exactly one line on stderr, no traceback."""
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    assert lines[0].startswith("sledge: "), lines[0]
    return lines[0]


def left_behind(out: Path, before_tmp: set[str]) -> list[str]:
    """What a refused or failed run must not leave: /tmp/sledge-* paths, run folders without a
    status in summary.json, processes started for it (their configs live under `out`)."""
    found = sorted(set(glob.glob("/tmp/sledge-*")) - before_tmp)
    for run in out.glob("*/") if out.is_dir() else []:
        try:
            status = json.loads((run / "summary.json").read_text()).get("status")
        except (OSError, ValueError):
            status = None
        if not status:
            found.append(f"run folder without status: {run}")
    for p in psutil.process_iter(["cmdline"]):
        if str(out) in " ".join(p.info["cmdline"] or []):
            found.append(f"process {p.pid}: {' '.join(p.info['cmdline'])}")
    return found


@pytest.fixture
def tmpfs(tmp_path):
    """A 256 KiB tmpfs of this test's own (mount as root; unmounted after)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    made = []

    def mount(*options: str) -> Path:
        opts = ",".join(("size=256k", "mode=755", *options))
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "sledge-test", str(mnt)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        made.append(mnt)
        return mnt

    yield mount
    for m in made:
        subprocess.run(["umount", str(m)], check=False)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A loopback run of 3 rounds stopped (as by Ctrl-C) after round 1."""
    from testbed import Experiment
    from testbed.emu.topology import load_topology
    from testbed.plan.config import RunConfig

    def stop(exp: Experiment, rnd: int) -> None:
        raise KeyboardInterrupt

    topo, name = load_topology(TINY)
    cfg = RunConfig(name="early", rounds=3, iters_per_round=2, dataset="digits",
                    train_limit=200, test_limit=100,
                    out_dir=str(tmp_path_factory.mktemp("early")))
    exp = Experiment(cfg, topo, topology=TINY, loopback=True, on_round=stop,
                     topology_args={"name": name, "params": {}})
    with pytest.raises(KeyboardInterrupt):
        exp.run()
    return Path(exp.run_dir.path)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:64])


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a checkpoint at all\n" * 10)


# (id, arguments (TMP: this test's folder), expected exit code, what the line must name)
CASES = [
    ("topology-syntax-error", ["run", "TMP/syntax.py", *FAST], 2, "syntax.py, line 2"),
    ("topology-raises-on-import", ["run", "TMP/raises.py", *FAST], 2, "raises.py, line 2"),
    ("topology-build-raises", ["run", "TMP/build.py", *FAST], 2, "build.py, line 5"),
    ("mnist-no-data-root", ["run", TINY, *FAST, "--dataset", "mnist"], 2, "'data.root'"),
    ("mnist-wrong-data-root", ["run", TINY, *FAST, "--dataset", "mnist", "--data-root", "TMP"],
     2, "train-images-idx3-ubyte"),
    ("cifar10-wrong-data-root", ["run", TINY, *FAST, "--dataset", "cifar10", "--data-root",
                                 "TMP/nothing"], 2, "data_batch_1.bin"),
    ("ham10000-wrong-data-root", ["run", TINY, *FAST, "--dataset", "ham10000", "--data-root",
                                  "TMP"], 2, "HAM10000_metadata.csv"),
    ("topology-not-python", ["run", "TMP/events.yaml", *FAST], 2, "events.yaml"),
    ("scenario-bad-event", ["scenario", "TMP/events.yaml", TINY], 2, "events[0]"),
    ("run-scenario-bad-event", ["run", TINY, *FAST, "--scenario", "TMP/events.yaml"], 2,
     "events[0]"),
    ("unknown-dataset", ["run", TINY, *FAST, "--dataset", "foo"], 2, "'data.dataset'"),
    ("out-is-a-file", ["run", TINY, *FAST, "--out", "TMP/syntax.py"], 2, "'run.out_dir'"),
    ("unknown-cut", ["run", TINY, *FAST, "--cut", "nosuchlayer"], 2, "'model.cuts'"),
    ("negative-bandwidth-loopback", ["run", TINY, *FAST, "-p", "bw=-1"], 2, "bw=-1"),
    ("bad-delay-loopback", ["run", TINY, *FAST, "-p", "delay=abc"], 2, "delay='abc'"),
    ("unknown-model", ["run", TINY, *FAST, "--model", "nope"], 2, "'model.name'"),
    ("unknown-scheme", ["run", TINY, *FAST, "--scheme", "nope"], 2, "'scheme.name'"),
    ("compare-unknown-dataset", ["compare", TINY, "--dataset", "foo", "--schemes", "psl"], 2,
     "'data.dataset'"),
    ("resume-truncated-checkpoint", ["resume", "RUN"], 2, "ckpt/c1.pt"),
    ("resume-garbage-checkpoint", ["resume", "RUN"], 2, "ckpt/c1.pt"),
    ("resume-corrupt-middle-line", ["resume", "RUN"], 2, "rounds.jsonl, line 1"),
]
PREPARE = {"resume-truncated-checkpoint": lambda run: _truncate(run / "ckpt" / "c1.pt"),
           "resume-garbage-checkpoint": lambda run: _garbage(run / "ckpt" / "c1.pt"),
           "resume-corrupt-middle-line": lambda run: (run / "rounds.jsonl").write_text(
               "{torn\n" + (run / "rounds.jsonl").read_text())}


@pytest.mark.parametrize("case,args,code,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_naming_it(case, args, code, names, tmp_path, request):
    for name, text in SCRIPTS.items():
        (tmp_path / name).write_text(text)
    out = tmp_path / "runs"
    run = None
    if "RUN" in args:
        run = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("stopped_run"), run)
        PREPARE[case](run)
    argv = [a.replace("TMP", str(tmp_path)).replace("RUN", str(run)) for a in args]
    if args[0] in ("run", "compare") and "--out" not in argv:
        argv += ["--out", str(out)]
    before = set(glob.glob("/tmp/sledge-*"))
    r = sledge(*argv)
    line = one_clean_line(r.stderr)
    assert r.returncode == code, (r.returncode, line)
    assert names in line, line
    assert not out.exists(), "a refused run left its out folder"
    assert not left_behind(tmp_path, before)


def test_unwritable_out_dir_is_named(tmp_path, tmpfs):
    mnt = tmpfs("ro")
    r = sledge("run", TINY, *FAST, "--out", str(mnt / "runs"))
    line = one_clean_line(r.stderr)
    assert r.returncode == 2
    assert "'run.out_dir'" in line and "Read-only file system" in line, line


def test_full_disk_says_so_by_name_and_marks_the_run_failed(tmp_path, tmpfs):
    out = tmpfs() / "runs"
    before = set(glob.glob("/tmp/sledge-*"))
    r = sledge("run", TINY, *FAST, "--rounds", "2", "--out", str(out))
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "No space left on device" in r.stderr, r.stderr
    (run,) = out.iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left on device" in summary["reason"]
    assert not left_behind(out, before)


def test_debug_shows_the_traceback_and_the_checks_see_it(tmp_path):
    """--debug adds the traceback; the same checks fail on that output, so they can fail."""
    (tmp_path / "raises.py").write_text(SCRIPTS["raises.py"])
    r = sledge("run", str(tmp_path / "raises.py"), *FAST, "--debug")
    assert r.returncode == 2
    assert "Traceback" in r.stderr and "broken on import" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("sledge: topology ")
    with pytest.raises(AssertionError):
        one_clean_line(r.stderr)


def test_leftover_checks_can_fail(tmp_path):
    """The nothing-left-behind check sees an unmarked run folder and a stray ipc folder."""
    (tmp_path / "20990101-000000-x").mkdir()
    stray = Path(f"/tmp/sledge-test-{os.getpid()}")
    before = set(glob.glob("/tmp/sledge-*"))
    stray.mkdir()
    try:
        found = left_behind(tmp_path, before)
    finally:
        stray.rmdir()
    assert any("without status" in f for f in found) and str(stray) in found


# -- resume that survives reality: a moved folder, a torn last line ---------------------------
def test_moved_run_folder_with_a_torn_last_line_resumes(stopped_run, tmp_path):
    """The stopped run, copied elsewhere (the original removed) with half a round 2 record at
    the end of rounds.jsonl: resume drops the torn line, names it, redoes round 2 and 3."""
    original = tmp_path / "original"
    shutil.copytree(stopped_run, original)
    moved = tmp_path / "elsewhere" / original.name
    shutil.copytree(original, moved)
    shutil.rmtree(original)
    # Nothing inside the folder points at where it was (node configs hold relative paths).
    for f in moved.rglob("*.json"):
        assert str(original) not in f.read_text(), f
    with open(moved / "rounds.jsonl", "a") as f:
        f.write('{"round": 2, "time": 17')
    r = sledge("resume", str(moved))
    assert r.returncode == 0, r.stderr
    assert "rounds.jsonl, line 2: torn record dropped" in " ".join(r.stdout.split())
    rounds = [json.loads(line) for line in (moved / "rounds.jsonl").read_text().splitlines()]
    assert [rec["round"] for rec in rounds] == [1, 2, 3]
    assert json.loads((moved / "summary.json").read_text())["status"] == "ok"


def test_a_finished_run_is_not_resumed(stopped_run, tmp_path):
    """The status marker decides: a run whose summary says ok refuses, one that says
    interrupted (the fixture's) resumes; so the check is not merely 'summary.json exists'."""
    from testbed.run.recovery import resume_state

    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert resume_state(run)["from_round"] == 1
    (run / "summary.json").write_text(json.dumps({"status": "ok"}))
    with pytest.raises(ValueError, match="the run completed"):
        resume_state(run)


# -- small pieces of the same contract, in process -------------------------------------------
def test_a_full_disk_in_the_controller_names_the_file(tmp_path, monkeypatch):
    """A failed write() carries no file name; the run folder's writes add it, and the CLI's
    line says 'No space left on device' with it (exit 1: the run failed, the input was fine)."""
    import errno

    from testbed.cli.main import _error
    from testbed.run.records import RunDir

    run = RunDir(tmp_path, "full")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as e:
        run.append("rounds.jsonl", {"round": 1})
    code, line = _error(e.value)
    assert code == 1
    assert line == f"run failed: {run.path / 'rounds.jsonl'}: No space left on device"


def test_controller_warnings_are_whole_lines(monkeypatch):
    """A warning of the controller's sockets goes through the console (above its live status
    line) as a line of its own."""
    import logging

    from testbed.cli.main import _ConsoleLog
    from testbed.run.records import console

    log = logging.getLogger("nodes.protocol")
    handler = _ConsoleLog(logging.WARNING)
    log.addHandler(handler)
    try:
        with console.capture() as cap:
            log.warning("endpoint %r dropped message from %r", "controller", "x")
    finally:
        log.removeHandler(handler)
    assert cap.get() == "warning: endpoint 'controller' dropped message from 'x'\n"
