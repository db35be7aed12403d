"""Node side of fault tolerance: heartbeats, aborting a round, rollback and rejoin.

Division of labour (docs/fault-tolerance.md): the controller (testbed.run.recovery) decides who is
dead and what every node does next; a node only
- beats: a `Heartbeat` thread with its own DEALER (identity `<name>#hb`) on the ipc control
  path sends HEARTBEAT every `interval_s`. It never touches the data plane, so a transfer that
  takes minutes on a slow link cannot delay a beat; ZeroMQ sockets are not thread-safe, hence
  its own socket;
- aborts: the same thread receives ABORT(epoch) from the controller and raises `abort_epoch`;
  every data-plane wait (protocol.Endpoint.interrupt) checks `abort_epoch > ctx.epoch` every
  100 ms, so a node blocked on a dead peer gives up within that, not after step_timeout_s;
- obeys two CTRL commands between attempts (COMMANDS, dispatched by nodes.runtime):
  `rollback` (enter a new epoch: stale messages dropped, queued ones forgotten; reload the
  checkpoint of the last round every node completed) and `rejoin` (say HELLO to / wait for the
  HELLO of a restarted peer, so both sides' sockets know each other again).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from nodes.context import NodeContext
from nodes.dataplane import open_data_plane
from nodes.protocol import Plane


class Heartbeat(threading.Thread):
    """Beats to the controller every `interval_s` and receives ABORTs, on its own socket."""

    def __init__(self, plane: Plane, name: str, control: str,
                 interval_s: float, epoch: int = 0,
                 status: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__(name=f"heartbeat-{name}", daemon=True)
        self.status = status or dict  # what the node is doing, sent with each beat
        self.plane, self.node, self.control = plane, name, control
        self.interval_s = interval_s
        self.abort_epoch = epoch  # the highest epoch the controller asked to abort towards
        self.beats = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        # Short send timeout and no linger: a beat that cannot leave is simply skipped.
        ep = self.plane.dealer(f"{self.node}#hb", self.control, "controller",
                               send_timeout_s=self.interval_s, linger_s=0.0)
        try:
            next_beat = time.monotonic()
            while not self._stop_evt.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    ep.epoch = self.abort_epoch  # the controller drops beats of older epochs
                    with contextlib.suppress(TimeoutError):
                        ep.send("HEARTBEAT", meta={"n": self.beats, **self.status()})
                        self.beats += 1
                    next_beat = now + self.interval_s
                try:
                    _, msg = ep.recv(max(0.0, min(next_beat - time.monotonic(), 0.1)))
                except TimeoutError:
                    continue
                if msg.type == "CTRL" and msg.meta.get("cmd") == "abort":
                    self.abort_epoch = max(self.abort_epoch, int(msg.meta["epoch"]))
        finally:
            ep.close()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(5.0)


def start_heartbeat(ctx: NodeContext, zctx: zmq.Context, config: dict[str, Any]
                    ) -> Heartbeat | None:
    """Start the node's heartbeat (config `fault.heartbeat_s`; none without a fault section)
    and make the data plane's waits abortable by it."""
    interval = config["fault"]["heartbeat_s"] if config.get("fault") else None
    if not interval:
        return None
    hb = Heartbeat(ctx.plane, ctx.name, config["control"], float(interval), ctx.epoch,
                   status=lambda: {"state": ctx.state, "iteration": ctx.iteration})
    hb.start()
    ctx.set_interrupt(lambda: hb.abort_epoch > ctx.epoch)
    return hb


def rollback(ctx: NodeContext, scheme: Any, zctx: zmq.Context, meta: dict) -> dict:
    """Enter epoch `meta.epoch` and reload the checkpoint of round `meta.to_round`."""
    ctx.set_epoch(int(meta["epoch"]))
    ctx.restore(int(meta["to_round"]))
    return {"epoch": ctx.epoch, "restored": int(meta["to_round"])}


def rejoin(ctx: NodeContext, scheme: Any, zctx: zmq.Context, meta: dict) -> dict:
    """HELLO on the endpoints named in `meta.hello` (peers or proxies, towards a restarted
    node) and wait for the HELLOs of the identities in `meta.accept` (from it)."""

    t0 = time.perf_counter()
    if ctx.router is not None:
        ctx.router.expect_from(*meta.get("accept", []))
    open_data_plane(ctx, list(meta.get("accept", [])), float(meta.get("timeout_s", 180.0)),
                    hello=list(meta.get("hello", [])))
    return {"rejoin_s": time.perf_counter() - t0}


COMMANDS = {"rollback": rollback, "rejoin": rejoin}
