"""The controller's control channel: commands to the nodes, and their replies collected.

One ROUTER socket (nodes.protocol) on the run's ipc path, and with `cluster.control` on a TCP
endpoint too, where the control forwarders of other machines (testbed.run.forward) connect,
CURVE and gatekeeper the same. `collect` waits for one message of a type from every node (or
some), while watching for the nodes' errors and deaths; everything that drives nodes between
rounds (the experiment's rounds, testbed.run.recovery's rollbacks and restarts,
testbed.scenario.migration's moves) goes through here, not through the Experiment's internals.
It does not decide what to send: its callers do. A remote node (`cluster.remote`) sends its
checkpoint with each round's REPORT; it is written here into the run folder, where a local
node writes its own, so evaluation and resume read the same file either way.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING, Any

from nodes.context import install_checkpoint, write_file
from testbed.errors import NodesDead, RunFailed

if TYPE_CHECKING:
    from nodes.protocol import Endpoint, Plane
    from testbed.run.experiment import Experiment

# A node that exited 0 during BYE collection has sent its BYE (its socket lingers until it is
# sent), but the BYE may still be in our I/O thread: waited for this long, not a death.
BYE_GRACE_S = 5.0


class ControlChannel:
    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.endpoint: Endpoint | None = None
        # Each node's protocol counters when it said HELLO: round 1's traffic counts from here.
        self.startup_proto: dict[str, dict] = {}
        self.tcp = ""  # the TCP endpoint as bound (port 0 resolved), for the forwarders
        self._kept: dict[str, int] = {}  # remote node -> round of the checkpoint kept for it

    def open(self, plane: Plane, addr: str, hosts: list[str], tcp: str = "") -> None:
        """Listen at `addr` (ipc://) and, given `tcp` ("<ip>:<port>"), there too."""
        # Only the run's nodes (and their heartbeat sockets) may speak to the controller.
        self.endpoint = plane.router("controller", addr,
                                     expected={*hosts, *(f"{h}#hb" for h in hosts)})
        if tcp:
            self.endpoint.bind(f"tcp://{tcp}")
            self.tcp = self.endpoint.last_endpoint.removeprefix("tcp://")

    @property
    def epoch(self) -> int:
        return self.endpoint.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        """From here the controller stamps this epoch and drops anything older."""
        self.endpoint.epoch = value

    # -- sending --------------------------------------------------------------------------------
    def send(self, node: str, rnd: int, **meta: Any) -> None:
        self.endpoint.send("CTRL", to=node, round=rnd, meta=meta)

    def broadcast(self, rnd: int, **meta: Any) -> None:
        for name in self.exp.procs:
            try:
                self.send(name, rnd, **meta)
            except ConnectionError:
                self._await_death(name)
                raise

    def _await_death(self, node: str) -> None:
        """The control socket has no pipe to `node`: its process went away, e.g. between two
        rounds, when nobody was collecting. Wait (reading heartbeats, so live nodes stay
        live) until recovery sees the death, and raise it as one (NodesDead, so the round is
        redone from the last checkpoints) instead of a send error. Returns if it does not
        show within the dead-node timeout: the caller raises the send error then."""
        exp = self.exp
        deadline = time.monotonic() + exp.recovery.liveness.timeout_s
        while time.monotonic() < deadline:
            if node in exp.recovery.dead():
                self.fail_if_dead()
            with contextlib.suppress(TimeoutError):
                sender, msg = self.endpoint.recv(0.05)
                exp.recovery.on_message(sender, msg)  # anything else is stale between rounds

    def interrupt(self, node: str, rnd: int, **meta: Any) -> None:
        """To the node's heartbeat thread (it acts at once, even mid-round); best effort."""
        with contextlib.suppress(ConnectionError, TimeoutError):
            self.send(f"{node}#hb", rnd, **meta)

    # -- receiving ------------------------------------------------------------------------------
    def baseline(self) -> dict[str, dict]:
        """Each node's protocol counters at the end of the last round (or at start-up): the
        next round's traffic is the difference."""
        rounds = self.exp.rounds
        return rounds[-1]["_proto"] if rounds else self.startup_proto

    def rebase(self, replies: dict[str, Any]) -> None:
        """Nodes that started again (restart, migration) count from their new counters."""
        self.baseline().update({n: m.get("proto", {}) for n, m in replies.items()})

    def collect(self, mtype: str, rnd: int, timeout_s: float, what: str,
                nodes: list[str] | None = None) -> dict[str, Any]:
        """Wait for one `mtype` message from every node (or from `nodes`), watching for
        errors and deaths."""
        exp = self.exp
        got: dict[str, Any] = {}
        want = set(exp.procs if nodes is None else nodes)
        deadline = time.monotonic() + timeout_s
        check = 0.0  # heartbeats keep the socket busy: check for deaths on a clock
        finished: dict[str, float] = {}  # node -> when it was seen to have exited with 0
        while len(got) < len(want):
            if (now := time.monotonic()) > deadline:
                missing = sorted(want - set(got))
                raise RunFailed(f"{what}: no {mtype} from {missing} within {timeout_s:.0f}s")
            if now >= check and not self.endpoint.poll(0):  # read queued beats first
                if mtype == "BYE":
                    # A node exits 0 only after its BYE left, but the BYE may still be in
                    # our I/O thread: not a death. Past a grace period it counts as said,
                    # without its counters.
                    for n in want - set(got):
                        p = exp.procs.get(n)
                        if p is not None and p.returncode() == 0:
                            finished.setdefault(n, now)
                    got.update({n: {} for n, t in finished.items()
                                if n not in got and now - t > BYE_GRACE_S})
                self.fail_if_dead(set(finished), clean_exit_ok=mtype == "BYE")
                check = now + 0.2
            try:  # recv, not poll+recv(0): an invalid message is dropped and must not crash us
                sender, msg = self.endpoint.recv(0.2)
            except TimeoutError:
                continue
            if exp.recovery.on_message(sender, msg):  # heartbeats, aborted rounds
                exp.show_progress()
                continue
            if msg.type == "ERROR":
                err = RunFailed(f"node {sender} failed: {msg.meta.get('error')} (log: "
                                f"{exp.run_dir.file('logs', f'{sender}.log')})")
                err.detail = msg.meta.get("traceback", "")  # `sledge --debug` shows it
                raise err
            if msg.type == mtype and msg.round == rnd and sender in want:
                if "checkpoint" in msg.tensors and sender in exp.cfg.cluster.remote:
                    self._keep_checkpoint(sender, msg.round, msg.tensors["checkpoint"])
                got[sender] = msg.meta
        return got

    def fail_if_dead(self, finished: set[str] | frozenset[str] = frozenset(), *,
                     clean_exit_ok: bool = False) -> None:
        """Raise if a node died; `finished` nodes exited on purpose (shutdown).
        clean_exit_ok (shutdown): a node that exits 0 between the caller's look and this one
        has said BYE too (seen with 50 forked clients), it did not die."""
        exp = self.exp
        for hook in exp.hooks:  # what failed on another thread (a scenario's timer) is raised here
            hook.check(exp)
        dead = {n: why for n, why in exp.recovery.dead().items()  # exited, or silent too long
                if n not in finished}
        if clean_exit_ok:  # looked at after dead(): a node exiting 0 in between is not missed
            dead = {n: why for n, why in dead.items()
                    if (p := exp.procs.get(n)) is None or p.returncode() != 0}
        details = []
        for p in exp.procs.values():
            rc = p.returncode()
            if rc is None or p.name not in dead:
                continue
            if exp.network.oom_kills(p.name):
                mem = exp.limits.get(p.name, {}).get("mem_mb")
                raise RunFailed(f"node {p.name} was killed by the kernel's OOM killer: it "
                                f"exceeded host {p.name}'s memory limit of {mem} MiB (mem_mb; "
                                f"exit code {rc}); log: {p.log_path}")
            details.append(f"node {p.name} exited with code {rc}; last log lines "
                           f"({p.log_path}):\n{p.log_tail()}")
        if dead:
            detail = "\n".join(details) or f"node(s) dead: {dead}"
            raise NodesDead(dead, detail) if exp.recovery.enabled else RunFailed(detail)
        if why := exp.recovery.stuck():
            raise RunFailed(f"nodes aborted their round but no node died: {why}")

    def _keep_checkpoint(self, node: str, rnd: int, data: Any) -> None:
        """A remote node's checkpoint of round `rnd` (its file's bytes, as a uint8 tensor),
        written where a local node writes its own: atomically, the previous round's kept as
        `.prev` as the node keeps it. The same round again (a redo after a rollback)
        replaces the current file only, so `.prev` stays the round before."""
        path = self.exp.run_dir.file("ckpt", f"{node}.pt")
        tmp = f"{path}.tmp"
        write_file(data.numpy().tobytes(), tmp)
        install_checkpoint(tmp, path, keep_prev=self._kept.get(node, rnd) < rnd)
        self._kept[node] = rnd

    def rejections(self) -> dict[str, int]:
        return self.endpoint.rejections() if self.endpoint is not None else {}

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
