"""Nodes on other servers of a Mininet cluster: their control forwarders and their processes.

`Forwarders` starts one control forwarder (testbed.run.forward) on each server that holds a
remote node, over SSH, before any node starts, and stops it at teardown (SIGTERM, so it removes
its socket file; then its empty folder). `ClusterLauncher` starts a node on its host's server:
it copies the node's config over SSH (`cat`, root-only) to the same path in a run folder there
(the node resolves its checkpoint relative to that file, so nothing else is rewritten), makes
`ckpt/`, and runs the node through the RemoteHost's `popen` (SSH, then mnexec into the host's
namespaces). The node's stdout comes back over SSH into `logs/<host>.log` here, its exit code
is the SSH process's, and stopping it signals the remote process group (its pid is written on
the server before the node starts), not only the local SSH client. Local hosts go to the
launcher it wraps (zygote or popen), unchanged.

It does not copy results back (a remote node's checkpoints arrive with its REPORTs:
testbed.run.control), install anything on the servers (sledge, its venv and the data must be
at the same paths there as here: docs/cluster.md), or restart nodes on another server.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import subprocess
import sys
import time
from typing import Any

from testbed.run.launcher import Launcher, NodeProcess


def is_remote(host: Any) -> bool:
    return bool(getattr(host, "isRemote", False))


def _env() -> list[str]:
    """What a node or forwarder needs in its environment on the server (as node_env here)."""
    return ["env", "PYTHONUNBUFFERED=1", "OMP_NUM_THREADS=1", "HOME=/root",
            f"PYTHONPATH={os.getcwd()}"]


def _remote(argv: list[str]) -> list[str]:
    """argv for the server's shell: SSH joins its arguments with spaces."""
    return [shlex.quote(a) for a in argv]


def _readline(proc: subprocess.Popen, deadline: float) -> str:
    """One line of `proc`'s stdout before `deadline` (monotonic), else ''."""
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
            return ""
        ch = os.read(proc.stdout.fileno(), 1)
        if not ch:
            break
        buf += ch
    return buf.decode(errors="replace").strip()


class RemoteNode(NodeProcess):
    """A node on another server: `pid` is the local SSH client's; signals go to the remote
    process group (read from the pid file the node's shell wrote before it started)."""

    def __init__(self, name: str, host: Any, popen: subprocess.Popen, log_path: str,
                 pid_file: str) -> None:
        super().__init__(name, popen.pid, log_path)
        self.host, self.popen, self.pid_file = host, popen, pid_file
        self._rpid: int | None = None

    def returncode(self) -> int | None:
        return self.popen.poll()

    def remote_pid(self) -> int | None:
        if self._rpid is None:
            out = self.host.rcmd(["cat", self.pid_file], tt=False).strip()
            self._rpid = int(out) if out.isdigit() else None
        return self._rpid

    def _signal(self, sig: int) -> None:
        rpid = self.remote_pid() if self.popen.poll() is None else None
        if rpid is not None:
            self.host.rcmd(["kill", f"-{int(sig)}", "--", f"-{rpid}"], tt=False)
        elif self.popen.poll() is None:  # not started remotely yet: the SSH client
            self.popen.send_signal(sig)


class ClusterLauncher(Launcher):
    """Remote hosts over SSH, the others by `local` (zygote or popen)."""

    def __init__(self, local: Launcher) -> None:
        self.local = local
        self.name = local.name

    def start(self, host: Any, config_path: str, log_path: str) -> NodeProcess:
        if not is_remote(host):
            return self.local.start(host, config_path, log_path)
        with open(config_path, "rb") as f:
            data = f.read()
        cfg = json.loads(data)
        run_dir = os.path.normpath(os.path.join(os.path.dirname(config_path), cfg["run_dir"]))
        pid_file = f"{config_path}.pid"
        # The config holds the node's secret key: root only, as here.
        copy = (f"umask 077 && mkdir -p {shlex.quote(os.path.dirname(config_path))} "
                f"{shlex.quote(os.path.join(run_dir, 'ckpt'))} && cat > {shlex.quote(config_path)}")
        p = host.rpopen(["sh", "-c", shlex.quote(copy)], tt=False, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT)
        out, _ = p.communicate(data, timeout=120)
        if p.returncode != 0:
            raise RuntimeError(f"{host.name}: copying its config to {host.server} failed: "
                               f"{out.decode(errors='replace').strip()}")
        node = [*_env(), sys.executable, "-m", "nodes", "--config", config_path]
        script = f"echo $$ > {shlex.quote(pid_file)}; cd {shlex.quote(os.getcwd())} && exec " \
                 + " ".join(shlex.quote(a) for a in node)
        # setsid -w: the node leads its own session and group (whatever mnexec's parent is)
        # and the SSH command ends with its exit code.
        argv = _remote(["mnexec", "-a", str(host.pid), "setsid", "-w", "sh", "-c", script])
        with open(log_path, "ab") as log:
            popen = host.popen(argv, mncmd=[], stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
        return RemoteNode(host.name, host, popen, log_path, pid_file)

    def close(self) -> None:
        self.local.close()


class Forwarders:
    """One control forwarder per server that holds a remote host, started over SSH."""

    def __init__(self) -> None:
        self.procs: dict[str, tuple[Any, subprocess.Popen, str]] = {}  # server -> ...
        self.listen = ""

    def start(self, hosts: list[Any], listen: str, to: str, timeout_s: float) -> None:
        """`listen`: the nodes' control path (without ipc://); `to`: the controller's TCP
        endpoint. Returns when every forwarder listens; raises if one does not in time."""
        self.listen = listen
        by_server = {h.server: h for h in hosts if is_remote(h)}
        fwd = [*_env(), sys.executable, "-m", "testbed.run.forward", "--listen", listen,
               "--to", to]
        script = f"echo $$; cd {shlex.quote(os.getcwd())} && exec " \
                 + " ".join(shlex.quote(a) for a in fwd)
        for server, host in by_server.items():
            p = host.rpopen(["sh", "-c", shlex.quote(script)], tt=False,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
            deadline = time.monotonic() + timeout_s
            rpid = _readline(p, deadline)
            self.procs[server] = (host, p, rpid)
            line = _readline(p, deadline)
            if not line.startswith("forwarding "):
                raise RuntimeError(f"control forwarder on {server} did not start: "
                                   f"{rpid} {line}")

    def stop(self) -> None:
        for host, p, rpid in self.procs.values():
            if rpid.isdigit() and p.poll() is None:
                host.rcmd(["kill", "-TERM", rpid], tt=False)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
            host.rcmd(["rmdir", os.path.dirname(self.listen)], tt=False)
        self.procs.clear()
