"""Shared fixtures: root checks for network tests, and a leak check around each of them."""

from __future__ import annotations

import glob
import os
import subprocess

import psutil
import pytest


def system_state() -> dict[str, set[str]]:
    """What a run may leave behind: interfaces, named netns, our child processes, ipc dirs."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    children = psutil.Process().children(recursive=True)
    return {
        "interfaces": {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()},
        "netns": {line.split()[0] for line in netns.splitlines() if line.strip()},
        "processes": {f"{p.pid} {' '.join(p.cmdline()[:4])}" for p in children if p.is_running()},
        "ipc_dirs": set(glob.glob("/tmp/sledge-*")),
    }


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves an interface, netns, child process or ipc dir behind."""
    before = system_state()
    yield
    after = system_state()
    leaked = {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}
    assert not leaked, f"left behind: {leaked}"


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="network tests build Mininet networks: run as root")
    for item in items:
        if "net" in item.keywords:
            item.add_marker(skip)
