"""The leak check itself: each kind it watches is reported when a test leaves one behind.

Every check here plants one leak of a kind, asserts the checker names it, then removes it; so a
checker that stopped looking at a kind fails here, not silently in the suite.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import pytest

from testbed.emu.network import CGROUP_ROOT, remove_cgroup
from tests.leakcheck import leaked, system_state

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="creates cgroups and interfaces: root")
TAG = f"sltk{os.getpid() % 100000}"


def hierarchies() -> list[str]:
    return [h for h in ("cpu", "cpuacct", "cpuset", "memory")
            if os.path.isdir(os.path.join(CGROUP_ROOT, h))]


@root_only
@pytest.mark.parametrize("hierarchy", hierarchies())
def test_a_cgroup_left_in_any_hierarchy_is_reported(hierarchy):
    before = system_state()
    path = os.path.join(CGROUP_ROOT, hierarchy, TAG)
    os.mkdir(path)
    try:
        assert leaked(before).get("cgroups") == [path]
    finally:
        os.rmdir(path)
    assert "cgroups" not in leaked(before)


@root_only
def test_an_interface_a_process_and_a_tmp_path_left_are_reported():
    before = system_state()
    subprocess.run(["ip", "link", "add", TAG, "type", "veth", "peer", "name", f"{TAG}b"],
                   check=True)
    proc = subprocess.Popen(["sleep", "60"])
    tmp = tempfile.mkdtemp(prefix="sledge-leaktest-")
    try:
        got = leaked(before)
        assert got["interfaces"] == [TAG, f"{TAG}b"]
        assert [p.split()[0] for p in got["processes"]] == [str(proc.pid)]
        assert got["tmp_paths"] == [tmp]
    finally:
        subprocess.run(["ip", "link", "del", TAG], check=False)
        proc.kill()
        proc.wait()
        os.rmdir(tmp)
    assert leaked(before) == {}


@root_only
def test_a_host_cleanup_removes_its_groups_in_every_separate_hierarchy():
    """What Mininet's own cgdelete misses where cpu, cpuacct and cpuset are mounted apart: our
    cleanup removes the host's group in each, with a process still inside one of them."""
    before = system_state()
    made = []
    for h in ("cpu", "cpuacct", "cpuset"):
        path = os.path.join(CGROUP_ROOT, h, TAG)
        if os.path.isdir(os.path.dirname(path)) and not os.path.isdir(path):
            os.mkdir(path)
            made.append(path)
    assert made
    cpu = os.path.join(CGROUP_ROOT, "cpu", TAG)
    proc = subprocess.Popen(["sleep", "60"])
    try:
        if cpu in made:  # a process left inside: it is the host's, and it must go for rmdir
            with open(os.path.join(cpu, "cgroup.procs"), "w") as f:
                f.write(str(proc.pid))
        for path in made:
            assert remove_cgroup(path, TAG)
        assert not any(os.path.isdir(p) for p in made)
        assert proc.wait(5) != 0  # killed, not left running in a group that is gone
    finally:
        proc.kill()
        proc.wait()
        for p in made:
            if os.path.isdir(p):
                os.rmdir(p)
    assert leaked(before) == {}
