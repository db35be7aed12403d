"""Fork-server node launch: one warm process imports torch once and forks every node.

A node started as its own interpreter costs ~150 MiB and ~1 s of CPU just to import torch;
a node forked from a warm zygote shares that memory copy-on-write (runtime-notes.md 2).
The zygote imports torch and the node code, sets ONE torch thread before any op (libgomp is
not fork-safe), runs one forward/backward of each model so lazy allocations happen before the
fork, and never creates a ZeroMQ context (each child makes its own after joining its host).
Each child: new session, joins its Mininet host's network namespace with setns (Python 3.11
has no os.setns, so libc; setns moves only the calling thread, which is the only one after
fork), joins the host's cgroups, redirects output to its log, then calls run_node(config).

The controller talks to the zygote over a Unix stream socket, one JSON line per request:
    {"cmd": "spawn", "config": PATH, "netns_pid": PID, "log": PATH, "cgroups": [PATH, ...]}
        -> {"pid": CHILD_PID}
    {"cmd": "status", "pid": PID} -> {"returncode": int | null}
    {"cmd": "exit"}
The zygote dies with the controller (PDEATHSIG) and its children die with it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
from typing import Any

CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def setns_net(pid: int) -> None:
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the network namespace of pid {pid}: "
                               f"{os.strerror(err)}")
    finally:
        os.close(fd)


def warm_up() -> None:
    """Import and exercise everything a node uses, so children share it copy-on-write."""
    import torch

    torch.set_num_threads(1)  # before any op: an OpenMP pool does not survive fork
    import nodes.runtime  # noqa: F401  (protocol, schemes, data, models)
    from nodes.data import DATASETS, load_dataset
    from nodes.imports import resolve
    from nodes.models import build_model

    # Data-set readers import their libraries lazily (scikit-learn for digits: ~100 MB);
    # import them here, once, instead of in every child.
    for name, spec in DATASETS.items():
        if not spec.needs_root:
            with contextlib.suppress(Exception):
                load_dataset(name, "test", limit=1)

    for ref in filter(None, os.environ.get("SLEDGE_PREIMPORT", "").split("\n")):
        with contextlib.suppress(Exception):  # a node that needs it says what is wrong
            resolve(ref, "preimport")
    for kw in ({"name": "smallcnn", "in_channels": 1, "image_size": 8},
               {"name": "smallcnn", "in_channels": 1, "image_size": 28}):
        m = build_model(**kw)
        x = torch.randn(2, kw["in_channels"], kw["image_size"], kw["image_size"])
        m(x).sum().backward()
        torch.optim.SGD(m.parameters(), lr=0.1).step()
    # Move every object made so far out of the collector's reach: a GC pass in a child would
    # otherwise write to (and so copy) every page of the inherited heap.
    gc.collect()
    gc.freeze()


def _child(req: dict[str, Any]) -> int:
    os.setsid()  # own process group: the controller stops it by group, never by name
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    log = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    if req["netns_pid"] is not None:  # None: a loopback host, the zygote's own namespace
        setns_net(int(req["netns_pid"]))
    for path in req.get("cgroups", []):
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    from nodes.nodeconfig import read
    from nodes.runtime import run_node

    return run_node(read(req["config"]))


class Zygote:
    def __init__(self, path: str) -> None:
        self.path = path
        self.exited: dict[int, int] = {}
        self.children: set[int] = set()

    def reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            self.exited[pid] = os.waitstatus_to_exitcode(status)

    def spawn(self, req: dict[str, Any]) -> int:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = _child(req)
            except BaseException as e:  # report, then leave without running parent cleanup
                with contextlib.suppress(Exception):
                    print(f"zygote child failed: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children.add(pid)
        return pid

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        self.reap()
        cmd = req.get("cmd")
        if cmd == "spawn":
            missing = [k for k in ("config", "netns_pid", "log") if k not in req]
            if missing:
                return {"error": f"spawn: missing field(s) {missing}"}
            return {"pid": self.spawn(req)}
        if cmd == "status":
            pid = int(req.get("pid", -1))
            if pid in self.exited:
                return {"returncode": self.exited[pid]}
            return {"returncode": None} if pid in self.children else \
                {"error": f"status: pid {pid} is not a child of this zygote"}
        return {"error": f"unknown cmd {cmd!r}; valid: spawn, status, exit"}

    def serve(self) -> None:
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(self.path)
        srv.listen(8)
        print("ready", flush=True)
        try:
            while True:
                conn, _ = srv.accept()
                with conn, conn.makefile("rw") as f:
                    for line in f:
                        try:
                            req = json.loads(line)
                        except ValueError as e:
                            f.write(json.dumps({"error": f"bad request: {e}"}) + "\n")
                            f.flush()
                            continue
                        if req.get("cmd") == "exit":
                            return
                        f.write(json.dumps(self.handle(req)) + "\n")
                        f.flush()
        finally:
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class ZygoteClient:
    """The controller's side: one connection, one JSON line each way per request."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.f = self.sock.makefile("rw")

    def call(self, **req: Any) -> dict[str, Any]:
        self.f.write(json.dumps(req) + "\n")
        self.f.flush()
        if req.get("cmd") == "exit":
            return {}
        reply = json.loads(self.f.readline() or "{}")
        if "error" in reply:
            raise RuntimeError(f"zygote: {reply['error']}")
        return reply

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
            self.sock.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.run.zygote",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True)
    a = ap.parse_args(argv)
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    warm_up()
    Zygote(a.socket).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
