"""The scenario engine: fires a timeline's events at their triggers, one at a time.

`ScenarioRunner` runs round-triggered events on the experiment's main thread and time-triggered
ones (and a move's samples, a trace's rows) on a timer thread, applying link events through
testbed.emu.linkops and handing node events to their reactions (testbed.scenario.reactions).
`simulate` runs a timeline on a recording network with a virtual clock (no Mininet). The
timeline's schema and loader are testbed.scenario.timeline; the experiment owns the network.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import Any

from testbed.emu.linkops import LinkOps, RecordingBackend
from testbed.plan.mobility import Mobility, base_stations, waypoint_samples
from testbed.scenario.timeline import (
    NEEDS_REACTION,
    Event,
    EventContext,
    Handover,
    LinkDown,
    LinkUp,
    Move,
    Reaction,
    Scenario,
    ScenarioError,
    SetLink,
    Trace,
)


# -- the engine ---------------------------------------------------------------------------------
class ScenarioRunner:
    """Fires a scenario's events. The experiment calls `before_round(n)`, `round_started(n)`
    (as round n's command goes out) and `after_round(n)` on its main thread, and
    `start_timer()` as round 1's command goes out; time-triggered events
    (and the samples of a move, the rows of a trace) then run on a timer thread. Everything
    runs under `lock` (the experiment's event lock), one event at a time. `log(record)` writes
    each event, reaction and link state (testbed.run.experiment: events.jsonl and the round's
    record). A failing event stops the timer and is raised on the main thread (`check`)."""

    def __init__(self, scenario: Scenario, topo: Any, ops: LinkOps, *, seed: int,
                 reactions: dict[str, Reaction], exp: Any = None,
                 log: Callable[[dict[str, Any]], None] | None = None,
                 lock: threading.RLock | None = None,
                 cells: Callable[[str], int | None] | None = None) -> None:
        self.scenario, self.ops, self.exp, self.reactions = scenario, ops, exp, reactions
        self.log = log or (lambda rec: None)
        self.lock = lock or threading.RLock()
        self.mobility = Mobility(scenario.radio, base_stations(topo), seed=seed,
                                 cells=cells or (lambda h: topo.nodeInfo(h).get("cell")),
                                 base_delay=self._declared_delay)
        for user, pos in scenario.positions.items():  # links follow before round 1
            self.mobility.place(user, pos)
        self.link_states: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.round, self.phase = 0, "before_round"
        self._queue: list[tuple[float, int, int, Callable[[], None], str]] = []
        self._seq = 0
        self._deferred: list[Callable[[Any], Any]] = []
        self._t0: float | None = None
        self._now: Callable[[], float] = time.monotonic
        self._wake = threading.Condition(self.lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self.by_round: dict[tuple[str, int], list[int]] = {}
        for i, ev in enumerate(scenario.events):
            trig, v = ev.trigger()
            if trig == "at":
                self._push(float(v), i, lambda i=i: self._fire(i), f"events[{i}]")
            else:
                self.by_round.setdefault((trig, int(v)), []).append(i)

    def _declared_delay(self, link: tuple[str, str]) -> tuple[float, float]:
        """One-way delays (a -> b, b -> a) the topology declared on the link."""
        for a, b, p in self.ops.backend.declared:
            if (a, b) == link:
                return p.up.delay_ms, p.down.delay_ms
            if (b, a) == link:
                return p.down.delay_ms, p.up.delay_ms
        return 0.0, 0.0

    # -- clock and queue ------------------------------------------------------------------------
    def t(self) -> float:
        return 0.0 if self._t0 is None else self._now() - self._t0

    def _push(self, due: float, index: int, fn: Callable[[], None], label: str) -> None:
        with self.lock:
            self._seq += 1
            heapq.heappush(self._queue, (due, self._seq, index, fn, label))
            self._wake.notify_all()

    def run_due(self, now: float) -> None:
        """Run every queued action due by `now` (seconds since round 1), in order."""
        while True:
            with self.lock:
                if not self._queue or self._queue[0][0] > now or self._stop:
                    return
                _, _, _, fn, _ = heapq.heappop(self._queue)
                fn()

    @property
    def started(self) -> bool:
        return self._t0 is not None

    def start_timer(self, clock: Callable[[], float] = time.monotonic,
                    thread: bool = True) -> None:
        """Round 1 starts now: time 0 of `at` triggers."""
        self._now, self._t0 = clock, clock()
        if thread:
            self._thread = threading.Thread(target=self._timer, name="scenario timer",
                                            daemon=True)
            self._thread.start()

    def _timer(self) -> None:
        try:
            while True:
                with self.lock:
                    while not self._stop and (not self._queue or self._queue[0][0] > self.t()):
                        self._wake.wait(None if not self._queue
                                        else max(0.0, self._queue[0][0] - self.t()))
                    if self._stop:
                        return
                self.run_due(self.t())
        except BaseException as e:  # surfaced on the main thread by check()
            self.error = e

    def check(self) -> None:
        """Raise, on the main thread, what failed on the timer thread."""
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def stop(self, log: bool = True) -> list[dict[str, Any]]:
        """Stop the timer; log (unless `log` is False) the actions never reached."""
        with self.lock:
            self._stop = True
            self._wake.notify_all()
            left = sorted(self._queue)
            self._queue = []
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        skipped = []
        for due, _, i, _, label in left if log else []:
            rec = {"kind": "skipped", "event": i, "what": label, "due_s": due,
                   "reason": f"the run ended at t={self.t():.3f}s"}
            self.log(rec)
            skipped.append(rec)
        return skipped

    # -- round boundaries (main thread) ---------------------------------------------------------
    def before_round(self, n: int) -> None:
        self.round, self.phase = n, "before_round"
        if not self.started and self.scenario.positions:
            with self.lock:  # the cells of users placed by `positions` get their rates
                for link, params in self.mobility.links():
                    self._link(-1, "mobility", link, params, cause="positions")
        self._drain_deferred()
        for i in self.by_round.get(("before_round", n), []):
            self._fire(i, thread="main")
        self._drain_deferred()
        self.check()

    def round_started(self, n: int) -> None:
        """Round n's command goes out now: its `during_round` events are due `at` seconds
        from here. Not from `before_round`: what the run does in between (reading the
        interface and qdisc counters that frame the round) takes seconds in a slow guest."""
        self.round, self.phase = n, "during_round"
        for i in self.by_round.get(("during_round", n), []):
            self._push(self.t() + self.scenario.events[i].at, i, lambda i=i: self._fire(i),
                       f"events[{i}]")
        self.check()

    def after_round(self, n: int) -> None:
        self.round, self.phase = n, "after_round"
        self.check()
        for i in self.by_round.get(("after_round", n), []):
            self._fire(i, thread="main")
        self._drain_deferred()

    def finish(self) -> None:
        """The run ended: deferred work runs, events never reached are logged."""
        self.stop()
        self._drain_deferred()

    def _drain_deferred(self) -> None:
        while self._deferred:
            fn = self._deferred.pop(0)
            with self.lock:
                fn(self.exp)

    # -- firing -----------------------------------------------------------------------------------
    def _ctx(self, index: int, thread: str, cause: str | None = None) -> EventContext:
        return EventContext(index=index, round=self.round, phase=self.phase, t=self.t(),
                            thread=thread, cause=cause, later=self._deferred.append)

    def _record(self, index: int, ev: Event, thread: str, **extra: Any) -> dict[str, Any]:
        fields_ = {k: v for k, v in ev.to_dict().items() if k != "kind"}
        rec = {"kind": "event", "event": index, "type": ev.kind, **fields_, "round": self.round,
               "phase": self.phase, "t": round(self.t(), 6), "thread": thread, **extra}
        self.log(rec)
        return rec

    def _fire(self, index: int, thread: str = "timer") -> None:
        ev = self.scenario.events[index]
        with self.lock:
            self._record(index, ev, thread)
            if isinstance(ev, Move):
                self._move(index, ev, thread)
            elif isinstance(ev, SetLink):
                self._link(index, "set_link", ev.link, ev.params)
            elif isinstance(ev, Trace):
                base = self.t()
                for k, (dt, params) in enumerate(ev.rows):
                    self._push(base + dt, index,
                               lambda p=params: self._link(index, "trace", ev.link, p),
                               f"events[{index}] trace row {k}")
            elif isinstance(ev, LinkDown):
                self._link(index, "link_down", ev.link)
            elif isinstance(ev, LinkUp):
                self._link(index, "link_up", ev.link)
            self.react(index, ev, thread)

    def react(self, index: int, ev: Event, thread: str, cause: str | None = None) -> None:
        """Hand the event to its registered reaction; log what it returns."""
        fn = self.reactions.get(ev.kind)
        if fn is None:
            if ev.kind in NEEDS_REACTION:
                raise ScenarioError(f"events[{index}] ({ev.kind}): no reaction registered for "
                                    f"{ev.kind!r} events: {ev.describe()}")
            return
        t0 = time.perf_counter()
        out = fn(self.exp, ev, self._ctx(index, thread, cause))
        rec = {"kind": "reaction", "event": index, "type": ev.kind, "round": self.round,
               "phase": self.phase, "t": round(self.t(), 6),
               "reaction_s": time.perf_counter() - t0}
        if isinstance(out, dict):
            rec.update({k: v for k, v in out.items() if k not in ("kind", "event")})
        self.log(rec)

    def _link(self, index: int, what: str, link: tuple[str, str],
              params: dict[str, Any] | None = None, cause: str | None = None) -> dict[str, Any]:
        a, b = link
        if what in ("set_link", "trace", "mobility"):
            out = self.ops.set_link(a, b, **(params or {}))
        elif what == "link_down":
            out = self.ops.link_down(a, b)
        else:
            out = self.ops.link_up(a, b)
        rec = {"kind": "link_state", "event": index, "by": what, "link": f"{a}-{b}",
               "seq": len(self.link_states), "round": self.round, "phase": self.phase,
               "t": round(self.t(), 6), **({"cause": cause} if cause else {}), **out}
        self.link_states.append(rec)
        self.log(rec)
        if what in ("link_down", "link_up") and out.get("paths_changed") and self.ops.applied \
                and getattr(self.ops.controller, "network", None) is not None:
            before, t_change = self.ops.last

            def probe() -> None:
                got = self.ops.first_traffic(before, t_change)
                self.log({"kind": "reroute", "event": index, "link": f"{a}-{b}", "by": what,
                          "routes_s": out.get("reroute_s"), **got})

            threading.Thread(target=probe, name="reroute probe", daemon=True).start()
        return rec

    def _move(self, index: int, ev: Move, thread: str) -> None:
        if ev.to is not None:
            self._position(index, ev.user, ev.to, thread)
            return
        base = self.t()
        for dt, pos in waypoint_samples(ev.waypoints, ev.speed, ev.step):
            if dt == 0:
                self._position(index, ev.user, pos, thread)
            else:
                self._push(base + dt, index,
                           lambda p=pos: self._position(index, ev.user, p, "timer"),
                           f"events[{index}] move {ev.user} to {pos}")

    def _position(self, index: int, user: str, pos: tuple[float, float], thread: str) -> None:
        """One position sample: a handover when another cell is stronger by the hysteresis,
        then the user's cell links take the rates and delays of the new geometry."""
        upd = self.mobility.update(user, pos)
        self.log({"kind": "position", "event": index, "user": user, "pos": list(pos),
                  "round": self.round, "t": round(self.t(), 6), **upd.summary()})
        if upd.handover is not None:
            ho = Handover(at=round(self.t(), 6), user=user, cell=upd.handover)
            self._record(index, ho, thread, cause="mobility", from_cell=upd.serving_before)
            self.react(index, ho, thread, cause="mobility")
        for cell_link, params in upd.links:
            self._link(index, "mobility", cell_link, params, cause=f"move {user}")


def simulate(scenario: Scenario, topo: Any, *, seed: int, rounds: int, round_s: float,
             reactions: dict[str, Reaction] | None = None,
             log: Callable[[dict[str, Any]], None] | None = None) -> ScenarioRunner:
    """Run the timeline on a recording network with a virtual clock (rounds of `round_s`
    seconds): the link states it would apply, no Mininet. Kinds that need a reaction get one
    that only records (unless `reactions` gives one)."""
    def record_only(exp: Any, ev: Event, ctx: EventContext) -> dict[str, Any]:
        return {"dry_run": True}

    backend = RecordingBackend()
    backend.prepare(topo)
    reactions = {**dict.fromkeys(NEEDS_REACTION, record_only), **(reactions or {})}
    runner = ScenarioRunner(scenario, topo, LinkOps(backend, applied=False), seed=seed,
                            reactions=reactions, log=log)
    clock = {"t": 0.0}
    for n in range(1, rounds + 1):
        runner.before_round(n)
        if n == 1:
            runner.start_timer(lambda: clock["t"], thread=False)
        runner.round_started(n)
        end = n * round_s
        while runner._queue and runner._queue[0][0] <= end:
            clock["t"] = runner._queue[0][0]
            runner.run_due(clock["t"])
        clock["t"] = end
        runner.after_round(n)
    runner.finish()
    return runner
