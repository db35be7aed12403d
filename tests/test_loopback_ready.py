"""Loopback runs just work: without Debian's mininet, with the default port taken, and without
capability lines that only a Mininet network uses. The Topo stand-in used without Mininet
describes every topology script exactly as Mininet's Topo does.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import testbed.emu.topolib as topolib
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "topologies" / "tiny.py")
FAST = ["--loopback", "--dataset", "digits", "--rounds", "1", "--iters", "1",
        "--train-limit", "200", "--test-limit", "100"]
# Makes every `import mininet...` fail in the interpreter that loads it (via PYTHONPATH),
# node processes included, as on a machine without Debian's mininet package.
NO_MININET = """\
import sys


class _NoMininet:
    def find_spec(self, name, path=None, target=None):
        if name == "mininet" or name.startswith("mininet."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, _NoMininet())
"""
MININET_ONLY = ("link emulation", "cgroups", "netem", "switch:", "not applied on link")


def sledge(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def no_mininet_env(tmp_path) -> dict:
    (tmp_path / "sitecustomize.py").write_text(NO_MININET)
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    probe = [sys.executable, "-c", "import mininet.topo"]
    # The blocker works (so the test below can fail), and only where it is installed.
    assert subprocess.run(probe, env=env, capture_output=True).returncode != 0
    return env


def test_help_and_a_loopback_run_need_no_mininet(no_mininet_env, tmp_path):
    r = sledge("--help", env=no_mininet_env)
    assert r.returncode == 0 and "usage: sledge" in r.stdout, r.stderr
    r = sledge("run", TINY, *FAST, "--out", str(tmp_path / "runs"), env=no_mininet_env)
    assert r.returncode == 0, r.stderr
    assert "round 1/1" in r.stdout
    # Building a Mininet network is where mininet is needed: one line says so.
    r = sledge("run", TINY, *FAST[1:], "--out", str(tmp_path / "mn"), env=no_mininet_env)
    assert r.returncode == 2 and "--loopback" in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1 and not (tmp_path / "mn").exists()


def test_taken_port_is_replaced_by_a_free_one_and_no_mininet_lines(tmp_path):
    """With the run's --port bound by someone else: exit 0 on other ports, said once; no
    netem/relay/cgroup/switch line; zygote-launched nodes."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The probe that picks ports sees the taken one (so the run below would collide).
        from testbed.run.preflight import _free, free_port_block

        assert not _free(port)
        assert free_port_block(port, 3) != port
        # The zygote launcher too: a loopback host has no namespace to enter.
        r = sledge("run", TINY, *FAST, "--port", str(port), "--launcher", "zygote",
                   "--out", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    (run,) = (tmp_path / "runs").iterdir()
    chosen = json.loads((run / "config.json").read_text())["config"]["net"]["port"]
    assert chosen != port
    assert f"ports from {chosen}" in r.stdout
    assert not [ln for ln in r.stdout.splitlines() if any(m in ln for m in MININET_ONLY)], \
        r.stdout
    assert json.loads((run / "summary.json").read_text())["status"] == "ok"


@pytest.mark.skipif(topolib.Topo is topolib.FallbackTopo, reason="needs Mininet to compare")
@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "topologies").glob("*.py")))
def test_fallback_topo_describes_every_topology_as_mininet_does(script, monkeypatch):
    def describe(topo) -> dict:
        return {"hosts": topo.hosts(), "switches": topo.switches(), "nodes": topo.nodes(),
                "info": {n: topo.nodeInfo(n) for n in topo.nodes()},
                "links": topo.links(sort=True, withKeys=True, withInfo=True),
                "unsorted": topo.links(), "ports": topo.ports}

    path = str(ROOT / "topologies" / script)
    real, _ = load_topology(path)
    monkeypatch.setattr(topolib, "Topo", topolib.FallbackTopo)
    stand_in, _ = load_topology(path)
    assert isinstance(stand_in, topolib.FallbackTopo)
    assert describe(stand_in) == describe(real)


def test_a_zygote_closed_while_it_warms_up_ends_and_leaves_nothing():
    """The zygote starts before the network is built; a run that fails before its first node
    starts closes it mid warm-up: the process ends and its folder goes (the leak check too)."""
    from testbed.run.launcher import ZygoteLauncher

    start_s = RunConfig().timeouts.start_s
    z = ZygoteLauncher(start_timeout_s=start_s)
    assert z.client is None and z.proc.poll() is None  # started, not waited for
    z.close()
    assert z.proc.poll() is not None and not os.path.exists(z.dir)
    z = ZygoteLauncher(start_timeout_s=start_s)  # warmed up: one connection, made on first use
    assert z.ready() is z.ready()
    z.close()
    assert z.proc.poll() is not None and not os.path.exists(z.dir)
