"""`sledge run --cli`: Mininet's own mininet> prompt on the run's network with the nodes up,
as a Mininet user would drive it (a pseudo-terminal: pexpect); leaving it lets training go
on, and the run ends with its report. A context manager tears a run down whatever happens."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pexpect
import pytest

from testbed import Experiment, RunConfig, load_topology

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "topologies" / "tiny.py")
QUICK = ["--dataset", "digits", "--rounds", "2", "--set", "train.iters_per_round=2",
         "--set", "data.train_limit=200", "--set", "data.test_limit=100"]


@pytest.mark.net
@pytest.mark.parametrize("when", ["start", "between_rounds", "end"])
def test_the_mininet_prompt_reaches_the_running_nodes_and_training_goes_on(tmp_path, when,
                                                                         no_leaks):
    child = pexpect.spawn(sys.executable, ["-m", "testbed.cli", "run", TINY, *QUICK,
                                           "--cli", when, "--out", str(tmp_path)],
                          cwd=str(ROOT), encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        before = {"start": 0, "between_rounds": 1, "end": 2}[when]  # rounds done at the prompt
        if before:
            child.expect(rf"round {before}/2")
        child.expect("mininet> ")
        rounds = list(tmp_path.glob("*/rounds.jsonl"))
        done = rounds[0].read_text().count("\n") if rounds else 0
        assert done == before  # nothing trains while the prompt is open
        child.sendline("pingall")
        child.expect(r"Results: 0% dropped")
        child.sendline("c1 ip -o -4 addr show")          # a command in a host's namespace
        child.expect(r"inet 10\.0\.0\.\d+")
        child.expect("mininet> ")
        child.sendline("exit")
        if when != "end":
            child.expect(r"round 2/2")
        child.expect(r"results: ")
        child.expect(pexpect.EOF)
    finally:  # a failed check must not leave the network behind: leave the prompt, SIGTERM
        if child.isalive():
            child.sendline("exit")
            try:
                child.expect(pexpect.EOF, timeout=60)
            except pexpect.TIMEOUT:
                child.kill(signal.SIGTERM)
                child.expect(pexpect.EOF, timeout=60)
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    (run,) = tmp_path.iterdir()
    assert (run / "rounds.jsonl").read_text().count("\n") == 2
    report = (run / "report.md").read_text()
    assert "status: **ok**" in report and "| 2 |" in report and "rounds.png" in report


def test_on_loopback_the_prompt_is_skipped_with_a_plain_message(tmp_path, capsys):
    from testbed.cli.main import main

    assert main(["run", TINY, "--loopback", "--cli", *QUICK, "--out", str(tmp_path)]) == 0
    assert "no mininet> prompt on the loopback network" in capsys.readouterr().out


def test_leaving_a_with_block_tears_the_run_down(tmp_path, no_leaks):
    """An error raised inside `with Experiment(...)` (after the run, say) still stops
    everything the run made; leaving twice is harmless."""
    topo, _ = load_topology(TINY)
    cfg = RunConfig(dataset="digits", rounds=1, iters_per_round=1, train_limit=100,
                    test_limit=50, out_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match="after the run"), \
            Experiment(cfg, topo, topology=TINY, loopback=True) as exp:
        exp.run()
        raise RuntimeError("after the run")
    assert exp._torn_down
    exp.__exit__(None, None, None)


def test_on_a_terminal_the_progress_line_shows_the_round_the_iteration_and_the_nodes(tmp_path):
    """The live line (a terminal only): round, the clients' iteration of the round's (from
    their heartbeats) and what the nodes are doing; then the round lines stay."""
    child = pexpect.spawn(sys.executable, ["-m", "testbed.cli", "run", TINY, "--loopback",
                                           "--dataset", "digits", "--rounds", "2", "--set",
                                           "train.iters_per_round=400", "--set",
                                           "data.test_limit=100", "--out", str(tmp_path)],
                          cwd=str(ROOT), encoding="utf-8", timeout=180, dimensions=(40, 200))
    try:
        child.expect(r"round 1: iteration (\d+)/400 · .*training \d")
        child.expect(r"round 1/2  loss")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
