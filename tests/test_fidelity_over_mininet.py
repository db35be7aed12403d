"""The fidelity monitor says when a round was not emulated faithfully: a CPU hog this test
starts for round 2 (bounded in time, its own processes) turns that round's verdict to
degraded, naming the host's idle CPU, and raises the relays' lateness; rounds 1 and 3, on a
quiet host, are ok with lateness near zero."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from testbed import Experiment, RunConfig, load_topology
from testbed.run.records import read_rounds

pytestmark = pytest.mark.net
ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "topologies" / "tiny.py")
# Busy loops that end by themselves after 30 s whatever happens to the test: one busy all the
# time (the host's idle CPU goes), one busy 0.15 s of every 0.5 s of the wall clock, the same
# 0.15 s on every core: bursts out of phase would leave a core free for the relay to move to
# (seen once in CI: no lateness at all).
HOG = "import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end: pass\n"
BURSTS = ("import time\nend = time.monotonic() + 30\nwhile time.monotonic() < end:\n"
          "    if time.time() % 0.5 < 0.15: continue\n"
          "    time.sleep(0.5 - time.time() % 0.5)\n")


def hogs() -> list[subprocess.Popen]:
    """On every core a steady hog at normal priority, and bursts at a real-time priority
    above the relays' (10): the relays run at real-time priority so that ordinary load does
    not delay them (the steady hogs alone leave their lateness where it was), so only load
    that outranks them, as other real-time work would, makes frames leave late."""
    procs = []
    for core in range(os.cpu_count() or 1):
        pin = ["taskset", "-c", str(core), sys.executable, "-c"]
        procs.append(subprocess.Popen([*pin, HOG]))
        procs.append(subprocess.Popen(["chrt", "-f", "20", *pin, BURSTS]))
    return procs


@pytest.mark.guest_heavy  # the relay's own lateness: the host's job, not the netem guest's
def test_a_cpu_hog_degrades_its_round_and_raises_relay_lateness(tmp_path, no_leaks):
    running: list[subprocess.Popen] = []

    def on_round(exp, rnd):
        if rnd == 1:
            running.extend(hogs())
        elif rnd == 2:
            for p in running:
                p.send_signal(signal.SIGKILL)
                p.wait(10)

    topo, _ = load_topology(TINY, params={"bw": 20, "delay": "10ms"})
    cfg = RunConfig(dataset="digits", rounds=3, iters_per_round=40, evaluate=False,
                    train_limit=600, out_dir=str(tmp_path), link_backend="relay")
    try:
        Experiment(cfg, topo, topology=TINY, on_round=on_round).run()
    finally:
        for p in running:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    rounds = read_rounds(next(tmp_path.iterdir()))
    quiet, loaded, after = (r["fidelity"] for r in rounds)
    assert quiet["verdict"] == "ok" and after["verdict"] == "ok", (quiet, after)
    assert loaded["verdict"] in ("degraded", "invalid")
    assert any(reason.startswith("host idle") for reason in loaded["reasons"]), loaded
    assert loaded["host"]["idle_min"] < 0.35 <= quiet["host"]["idle_min"]

    def worst(f: dict, key: str) -> float:
        return max(r[d][key] for r in f["relays"].values() for d in ("up", "down")
                   if r[d][key] is not None)

    assert set(quiet["relays"]) == {"c1-s1", "c2-s1"} and worst(quiet, "p50_ms") <= 0.5
    assert worst(loaded, "p99_ms") > max(2 * worst(quiet, "p99_ms"), 1.0)
    assert worst(loaded, "max_ms") > 10 * worst(quiet, "max_ms")
    for f in (quiet, loaded):
        assert {"c1", "c2", "srv"} <= set(f["nodes"]) and f["mem_available_mb"] > 0


def test_netem_links_report_their_qdisc_counters_each_round(tmp_path, no_leaks):
    """Where the kernel has netem (a guest built by scripts/vm.sh), every round's record has
    each shaped link's netem counters for that round: frames sent both ways, and drops where
    the link loses 10 % of its frames."""
    from testbed.emu.capabilities import probe

    if not probe().netem:
        pytest.skip("this kernel has no netem (run it in a guest: docs/vm.md)")
    topo, _ = load_topology(TINY, params={"bw": 20, "delay": "5ms", "loss": 10})
    cfg = RunConfig(dataset="digits", rounds=2, iters_per_round=5, evaluate=False,
                    train_limit=200, out_dir=str(tmp_path), link_backend="netem")
    Experiment(cfg, topo, topology=TINY).run()
    rounds = read_rounds(next(tmp_path.iterdir()))
    for r in rounds:
        q = r["fidelity"]["qdiscs"]
        assert set(q) >= {"c1-s1", "c2-s1"}, q
        for d in ("up", "down"):
            assert q["c1-s1"][d]["packets"] > 0 and q["c1-s1"][d]["backlog"] >= 0
    # counted per round, not since the start: no round holds the whole run's frames
    sent = [r["fidelity"]["qdiscs"]["c1-s1"]["up"]["packets"] for r in rounds]
    assert all(0 < s < sum(sent) for s in sent)
    assert sum(r["fidelity"]["qdiscs"]["c1-s1"][d]["drops"] for r in rounds
               for d in ("up", "down")) > 0
