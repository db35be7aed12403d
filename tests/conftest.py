"""Shared fixtures: root checks for network tests, and a leak check around them.

Every test marked `net`, and every test that asks for `no_leaks`, fails if it leaves anything
of the kinds tests/leakcheck.py knows (interfaces, namespaces, cgroups in every hierarchy,
processes, /tmp/sledge-* paths); the whole session is checked the same way once at its end,
which also covers module-scoped fixtures.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.leakcheck import describe, leaked, system_state

__all__ = ["system_state"]
SETTLE_S = 3.0  # a process sent SIGTERM in teardown may take a moment to be reaped


def _check(before: dict[str, set[str]]) -> None:
    deadline = time.monotonic() + SETTLE_S
    while (leaks := leaked(before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leaks, f"left behind: {describe(leaks)}"


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves an interface, netns, cgroup, process or ipc dir behind."""
    before = system_state()
    yield
    _check(before)


@pytest.fixture(autouse=True)
def _net_tests_leave_nothing(request):
    if request.node.get_closest_marker("net") is None or "no_leaks" in request.fixturenames:
        yield
        return
    before = system_state()
    yield
    _check(before)


@pytest.fixture(autouse=True, scope="session")
def _session_leaves_nothing():
    before = system_state()
    yield
    _check(before)


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="network tests build Mininet networks: run as root")
    for item in items:
        if "net" in item.keywords:
            item.add_marker(skip)
