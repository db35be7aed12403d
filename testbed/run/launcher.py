"""Node processes: start one per Mininet host, watch them, and make sure they end.

Two launchers, one interface (start, close) and one handle type per started node:
- `PopenLauncher` (`--launcher popen`): a fresh interpreter per node via `host.popen` (mnexec:
  the host's namespaces; mnexec -d makes the node lead its own process group). A shell first
  joins all the host's cgroups (mnexec -g joins cpu, cpuacct and cpuset, not memory), then
  execs mnexec, so every byte the interpreter allocates is charged to the host.
- `ZygoteLauncher` (the default): testbed.run.zygote, a warm process that forks each node into
  its host's namespace and cgroups: ~10x less memory per node and no per-node torch import. It
  is started first and warms up while the controller builds the network and the plan.
Teardown signals only the process groups this launcher started - never anything by name.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from testbed.emu.owned import owned_tmpdir

if TYPE_CHECKING:
    from testbed.run.zygote import ZygoteClient

CGROUP_JOIN_FAILED = 125  # exit code of a node that could not join its host's cgroups


class NodeProcess:
    """A started node: its pid (leader of its own process group), exit code, log."""

    def __init__(self, name: str, pid: int, log_path: str) -> None:
        self.name, self.pid, self.log_path = name, pid, log_path

    def returncode(self) -> int | None:
        raise NotImplementedError

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

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while (rc := self.returncode()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
        return rc

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM to the node's group, SIGKILL after `grace_s`; returns the exit code."""
        if self.returncode() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self._signal(signal.SIGTERM)
            if self.wait(grace_s) is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    self._signal(signal.SIGKILL)
                self.wait(5)
        else:  # the leader is gone; its group may not be
            with contextlib.suppress(ProcessLookupError, PermissionError):
                self._signal(signal.SIGKILL)
        return self.returncode()


class PopenNode(NodeProcess):
    def __init__(self, name: str, popen: subprocess.Popen, log_path: str) -> None:
        super().__init__(name, popen.pid, log_path)
        self.popen = popen

    def returncode(self) -> int | None:
        return self.popen.poll()


class Launcher:
    name = ""

    def start(self, host: Any, config_path: str, log_path: str) -> NodeProcess:
        raise NotImplementedError

    def close(self) -> None:
        pass


class PopenLauncher(Launcher):
    name = "popen"

    def start(self, host: Any, config_path: str, log_path: str) -> NodeProcess:
        env = node_env()
        kw: dict[str, Any] = {}
        if cgroups := host_cgroups(host):
            # Joined before mnexec enters the host: its mount namespace has a fresh /sys
            # without the cgroup mounts (mnexec -g also joins before attaching).
            kw["mncmd"] = joining(cgroups, ["mnexec", "-da", str(host.pid)])
        with open(log_path, "ab") as log:
            p = host.popen([sys.executable, "-m", "nodes", "--config", config_path],
                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           env=env, **kw)
        return PopenNode(host.name, p, log_path)


def joining(cgroups: list[str], cmd: list[str]) -> list[str]:
    """`cmd`, run by a shell that first moves itself (same pid after exec) into `cgroups`."""
    if not cgroups:
        return cmd
    dirs = " ".join(shlex.quote(d) for d in cgroups)
    script = (f'for d in {dirs}; do echo $$ > "$d/cgroup.procs" || exit {CGROUP_JOIN_FAILED}; '
              'done; exec "$@"')
    return ["sh", "-c", script, "sh", *cmd]


def host_cgroups(host: Any) -> list[str]:
    """The cgroup v1 directories a node must join to be limited like its host: the host's own
    list (testbed.emu.network.LimitedHost), else those Mininet's CPULimitedHost names after it."""
    if hasattr(host, "cgroup_dirs"):
        return host.cgroup_dirs()
    if not hasattr(host, "cgroup"):  # a plain host: no cgroup, whatever exists by its name
        return []
    from testbed.emu.network import CGROUP_ROOT, usable_cgroups  # Mininet hosts only

    return usable_cgroups([os.path.join(CGROUP_ROOT, c, host.name)
                           for c in ("cpu", "cpuacct", "cpu,cpuacct", "cpuset")])


class ForkedNode(NodeProcess):
    """A node forked by the zygote: not our child, so its exit code comes from the zygote."""

    def __init__(self, name: str, pid: int, log_path: str, launcher: ZygoteLauncher) -> None:
        super().__init__(name, pid, log_path)
        self.launcher = launcher
        self._rc: int | None = None

    def returncode(self) -> int | None:
        if self._rc is not None:
            return self._rc
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    return None  # alive; asking the zygote every poll would be wasteful
        except FileNotFoundError:
            pass
        self._rc = self.launcher.status(self.pid)
        return self._rc


class ZygoteLauncher(Launcher):
    name = "zygote"

    def __init__(self, *, start_timeout_s: float, preimport: tuple[str, ...] = ()) -> None:
        """Start the zygote and return at once: it warms up (imports torch, ~2 s) while the
        controller builds the network and the plan; the first `start` waits for it."""
        self.dir = owned_tmpdir("zygote")
        self.path = os.path.join(self.dir, "zygote.sock")
        self.start_timeout_s = start_timeout_s
        env = node_env()
        env["SLEDGE_PREIMPORT"] = "\n".join(preimport)  # the user's code, warm in the zygote
        self.log_path = os.path.join(self.dir, "zygote.log")
        self._t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "testbed.run.zygote", "--socket",
                                          self.path], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)
        self.client: ZygoteClient | None = None

    def ready(self) -> ZygoteClient:
        """The connection to the zygote, waiting (once) until it has warmed up and listens."""
        if self.client is not None:
            return self.client
        from testbed.run.zygote import ZygoteClient

        deadline = self._t0 + self.start_timeout_s
        while True:  # the socket file exists from bind(); connecting waits for listen()
            try:
                self.client = ZygoteClient(self.path)
                return self.client
            except (FileNotFoundError, ConnectionRefusedError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError(f"zygote did not start: {self._log()}") from None
                time.sleep(0.02)

    def _log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def start(self, host: Any, config_path: str, log_path: str) -> NodeProcess:
        # A loopback host has no namespace (no pid): the child stays in the zygote's.
        r = self.ready().call(cmd="spawn", config=config_path,
                              netns_pid=getattr(host, "pid", None), log=log_path,
                              cgroups=host_cgroups(host))
        return ForkedNode(host.name, int(r["pid"]), log_path, self)

    def status(self, pid: int) -> int | None:
        return self.ready().call(cmd="status", pid=pid)["returncode"]

    def close(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.call(cmd="exit")
            self.client.close()
        elif self.proc.poll() is None:  # never connected (still warming up): it exits on TERM
            self.proc.terminate()
        if self.proc.poll() is None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def node_env() -> dict[str, str]:
    """A node's environment: unbuffered, one OpenMP thread, and the folder sledge was started
    in on the import path, so a user's `pkg.module:attr` resolves in the nodes as it did in
    the controller (nodes.imports)."""
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def make_launcher(kind: str, preimport: tuple[str, ...] = (), *,
                  start_timeout_s: float) -> Launcher:
    """`preimport`: references to the user's code (model, data set, scheme) that a zygote
    imports once before it forks the nodes; `start_timeout_s`: how long its warm-up may take
    (the run's `timeouts.start_s`: an emulated guest imports torch in a minute or more)."""
    if kind == "popen":
        return PopenLauncher()
    if kind == "zygote":
        return ZygoteLauncher(start_timeout_s=start_timeout_s, preimport=preimport)
    raise ValueError(f"launcher {kind!r} is unknown; valid: popen, zygote")


def stop_all(procs: list[NodeProcess], grace_s: float = 5.0) -> None:
    for p in procs:  # signal all first, so they stop in parallel
        if p.returncode() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                p._signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.stop(max(0.1, deadline - time.monotonic()))
