"""Node processes: start one per Mininet host, watch them, and make sure they end.

Nodes are started with `host.popen` (mnexec: the host's network namespace and its CPU
cgroup; mnexec -d makes each node the leader of its own process group). Teardown signals
only the process groups this launcher started - never anything found by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from mininet.node import Host


@dataclass
class NodeProcess:
    name: str
    popen: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.popen.pid

    def returncode(self) -> int | None:
        return self.popen.poll()

    def log_tail(self, lines: int = 25) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        try:
            pgid = os.getpgid(self.pid)
        except ProcessLookupError:
            return
        # Only a group the node leads: never our own (which would signal the controller).
        if pgid == self.pid and pgid != os.getpgid(0):
            os.killpg(pgid, sig)
        else:
            os.kill(self.pid, sig)

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; reaps the process."""
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.popen.wait(5)
        else:  # the leader is gone; its group may not be
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self._signal(signal.SIGKILL)
        return self.popen.returncode


def start_node(host: Host, config_path: str, log_path: str) -> NodeProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    try:
        p = host.popen([sys.executable, "-m", "nodes", "--config", config_path],
                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    finally:
        log.close()
    return NodeProcess(name=host.name, popen=p, log_path=log_path)


def stop_all(procs: list[NodeProcess], grace_s: float = 5.0) -> None:
    deadline = time.monotonic() + grace_s
    for p in procs:  # give them all the same grace period, not one each
        p.stop(max(0.1, deadline - time.monotonic()))
