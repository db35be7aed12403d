"""Scenario timelines: what happens to the network and the nodes while a run trains.

Division of labour. This module is the timeline and its engine: `Scenario` (plain dataclasses,
loaded from YAML with errors that name the event and the field), `ScenarioRunner` (fires each
event at its trigger: a time in seconds since round 1 started, on a timer thread, or a round
boundary, on the experiment's main thread) and the reaction registry (`REACTIONS`, `register`).
testbed.mobility turns positions into link states and handovers; the experiment
(testbed.experiment) owns the network and the nodes; the link events go through `LinkOps`, which
applies them to the emulated links and lets the controller re-route (testbed.controller).

Events the runner carries out itself: move, set_link, trace, link_down, link_up. Events it
hands to the registry: handover (testbed.migration), kill, restart, add_client, remove_client
(fault tolerance): a kind in NEEDS_REACTION without a registered reaction fails the run before
the network is built, naming the event. Any kind may also have a registered reaction, called
after the built-in handling (e.g. to react to a link going down).

Determinism: the timeline is compiled into the same ordered actions for the same scenario,
topology and seed; the only randomness (shadowing) comes from a numpy Generator seeded with the
run's seed, drawn in a fixed order. Every applied link state is logged (`link_states`, and the
run's events.jsonl). `simulate` runs a timeline on a recording network with a virtual clock, so
the sequence of link states can be checked without Mininet. Interface: docs/scenarios.md.
"""

from __future__ import annotations

import heapq
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import yaml

from testbed.linkmodel import LinkParams
from testbed.links import LinkBackend, load_trace, shaping_params
from testbed.mobility import Mobility, Radio, base_stations, waypoint_samples


class ScenarioError(ValueError):
    """A scenario that cannot run: the message names the event (its index) and the field."""


# -- the events ---------------------------------------------------------------------------------
TRIGGERS = ("at", "before_round", "after_round", "during_round")


@dataclass(kw_only=True)
class Event:
    """One timeline entry. One trigger: `at` (seconds since round 1 started), `before_round` N
    (before round N starts), `after_round` N (after round N is recorded), or `during_round` N
    with `at` (seconds after round N started: mid-round, whatever the rounds before took)."""

    kind: ClassVar[str] = ""
    at: float | None = None
    before_round: int | None = None
    after_round: int | None = None
    during_round: int | None = None

    def trigger(self) -> tuple[str, float]:
        given = [t for t in TRIGGERS if getattr(self, t) is not None]
        if given == ["at", "during_round"]:
            return "during_round", self.during_round
        if len(given) != 1 or given == ["during_round"]:
            raise ValueError(("at", f"expected one trigger: 'at', 'before_round', "
                                    f"'after_round', or 'during_round' with 'at'; got "
                                    f"{given or 'none'}"))
        return given[0], getattr(self, given[0])

    def check(self) -> None:
        """Raise ValueError((field, what)) on a bad value."""
        name, v = self.trigger()
        if self.at is not None:
            _need(_is_num(self.at) and self.at >= 0, "at", "expected seconds >= 0", self.at)
        if name != "at":
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name,
                  "expected a round number >= 1", v)

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.to_dict().items())


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _need(ok: bool, fld: str, what: str, got: Any) -> None:
    if not ok:
        raise ValueError((fld, f"{what}, got {got!r}"))


def _point(v: Any, fld: str) -> tuple[float, float]:
    _need(isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_num(x) for x in v), fld,
          "expected a position [x, y] in metres", v)
    return float(v[0]), float(v[1])


def _name(v: Any, fld: str) -> str:
    _need(isinstance(v, str) and bool(v), fld, "expected a node name", v)
    return v


@dataclass(kw_only=True)
class LinkEvent(Event):
    link: tuple[str, str]

    def check(self) -> None:
        super().check()
        _need(isinstance(self.link, (list, tuple)) and len(self.link) == 2
              and all(isinstance(x, str) and x for x in self.link), "link",
              "expected the two node names [a, b] of a topology link", self.link)
        self.link = (self.link[0], self.link[1])


@dataclass(kw_only=True)
class Move(Event):
    """Move `user` to `to`, or along `waypoints` (it jumps to the first) at `speed` m/s, its
    position sampled every `step` seconds (each sample updates its link and may hand over)."""

    kind: ClassVar[str] = "move"
    user: str
    to: tuple[float, float] | None = None
    waypoints: list[tuple[float, float]] | None = None
    speed: float | None = None
    step: float = 1.0

    def check(self) -> None:
        super().check()
        _name(self.user, "user")
        _need((self.to is None) != (self.waypoints is None), "to",
              "expected exactly one of 'to' (a position) and 'waypoints' (a list)",
              {"to": self.to, "waypoints": self.waypoints})
        if self.to is not None:
            self.to = _point(self.to, "to")
            return
        _need(isinstance(self.waypoints, list) and len(self.waypoints) >= 2, "waypoints",
              "expected a list of at least two positions [x, y]", self.waypoints)
        self.waypoints = [_point(p, f"waypoints[{i}]") for i, p in enumerate(self.waypoints)]
        _need(_is_num(self.speed) and self.speed > 0, "speed",
              "expected metres per second > 0 with waypoints", self.speed)
        _need(_is_num(self.step) and self.step > 0, "step", "expected seconds > 0", self.step)


@dataclass(kw_only=True)
class Handover(Event):
    """`user` hands over to cell `cell` (reaction: testbed.migration)."""

    kind: ClassVar[str] = "handover"
    user: str
    cell: int

    def check(self) -> None:
        super().check()
        _name(self.user, "user")
        _need(isinstance(self.cell, int) and not isinstance(self.cell, bool) and self.cell >= 1,
              "cell", "expected a cell number >= 1", self.cell)


@dataclass(kw_only=True)
class SetLink(LinkEvent):
    """Change the link's parameters (Mininet keys: bw, delay, jitter, loss, max_queue_size, and
    their _up / _down variants, `up` being link[0] -> link[1]); the rest stay as they are."""

    kind: ClassVar[str] = "set_link"
    params: dict[str, Any]

    def check(self) -> None:
        super().check()
        _need(isinstance(self.params, dict) and bool(self.params), "params",
              "expected a mapping of link parameters, e.g. {bw: 10, delay: 5ms}", self.params)
        try:
            LinkParams.from_mininet(**self.params)
        except (ValueError, TypeError) as e:
            raise ValueError(("params", str(e))) from None


@dataclass(kw_only=True)
class Trace(LinkEvent):
    """Replay a CSV bandwidth trace on the link (testbed.links.load_trace: a `time_s` column,
    then link keys), its times relative to the trigger. A relative `file` is relative to the
    scenario file."""

    kind: ClassVar[str] = "trace"
    file: str
    rows: list[tuple[float, dict[str, Any]]] = field(default_factory=list, repr=False)

    def check(self) -> None:
        super().check()
        _need(isinstance(self.file, str) and bool(self.file), "file", "expected a CSV path",
              self.file)
        try:
            self.rows = load_trace(self.file)
        except (OSError, ValueError) as e:
            raise ValueError(("file", str(e))) from None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if k != "rows"}


@dataclass(kw_only=True)
class LinkDown(LinkEvent):
    kind: ClassVar[str] = "link_down"


@dataclass(kw_only=True)
class LinkUp(LinkEvent):
    kind: ClassVar[str] = "link_up"


@dataclass(kw_only=True)
class NodeEvent(Event):
    node: str

    def check(self) -> None:
        super().check()
        _name(self.node, "node")


@dataclass(kw_only=True)
class Kill(NodeEvent):
    """Kill the node process on host `node` with `signal` (KILL or TERM)."""

    kind: ClassVar[str] = "kill"
    signal: str = "KILL"

    def check(self) -> None:
        super().check()
        _need(self.signal in ("KILL", "TERM"), "signal", "expected 'KILL' or 'TERM'",
              self.signal)


@dataclass(kw_only=True)
class Restart(NodeEvent):
    kind: ClassVar[str] = "restart"


@dataclass(kw_only=True)
class AddClient(NodeEvent):
    kind: ClassVar[str] = "add_client"


@dataclass(kw_only=True)
class RemoveClient(NodeEvent):
    kind: ClassVar[str] = "remove_client"


KINDS: dict[str, type[Event]] = {c.kind: c for c in (
    Move, Handover, SetLink, Trace, LinkDown, LinkUp, Kill, Restart, AddClient, RemoveClient)}
BUILT_IN = ("move", "set_link", "trace", "link_down", "link_up")
NEEDS_REACTION = ("handover", "kill", "restart", "add_client", "remove_client")


# -- the reaction registry ----------------------------------------------------------------------
@dataclass
class EventContext:
    """What a reaction is told besides the event. `later(fn)` runs fn(exp) on the main thread
    at the next round boundary (before the next round starts, or when the run ends): work that
    needs the control socket or must not overlap a round goes there."""

    index: int          # the event's index in the timeline (a derived event: its cause's)
    round: int          # the round in progress (during_round) or about to start / just done
    phase: str          # "before_round" | "after_round" | "during_round"
    t: float            # seconds since round 1 started (0 before it)
    thread: str         # "main" | "timer"
    cause: str | None   # why a derived event happened, e.g. "mobility"
    later: Callable[[Callable[[Any], Any]], None]


# A reaction: fn(exp, event, ctx) -> a dict (logged as the reaction record) or None.
Reaction = Callable[[Any, Event, EventContext], "dict[str, Any] | None"]
REACTIONS: dict[str, Reaction] = {}


def register(kind: str, fn: Reaction | None = None) -> Any:
    """Register the reaction to events of `kind` for every later Experiment (each copies the
    registry into its own `exp.reactions`, which may be changed per run). Usable as a
    decorator: @register("kill")."""
    if kind not in KINDS:
        raise ValueError(f"register: unknown event kind {kind!r}; valid: {sorted(KINDS)}")

    def put(f: Reaction) -> Reaction:
        REACTIONS[kind] = f
        return f

    return put if fn is None else put(fn)


# -- the scenario -------------------------------------------------------------------------------
def event_from_dict(i: int, d: Any, base_dir: str = ".") -> Event:
    where = f"events[{i}]"
    if not isinstance(d, dict):
        raise ScenarioError(f"{where}: expected a mapping with a 'kind', got {d!r}")
    kind = d.get("kind")
    if kind not in KINDS:
        raise ScenarioError(f"{where} field 'kind': unknown event kind {kind!r}; valid: "
                            f"{sorted(KINDS)}")
    cls = KINDS[kind]
    valid = [f.name for f in fields(cls) if f.name != "rows"]
    unknown = sorted(set(d) - {"kind", *valid})
    if unknown:
        raise ScenarioError(f"{where} ({kind}) field {unknown[0]!r}: unknown; valid: {valid}")
    args = {k: v for k, v in d.items() if k != "kind"}
    if kind == "trace" and isinstance(args.get("file"), str):
        args["file"] = os.path.join(base_dir, args["file"])
    required = [f.name for f in fields(cls) if f.default is MISSING
                and f.default_factory is MISSING]
    for name in required:
        if name not in args:
            raise ScenarioError(f"{where} ({kind}) field {name!r}: required")
    return check_event(i, cls(**args))


def check_event(i: int, ev: Event) -> Event:
    try:
        ev.check()
    except ValueError as e:
        fld, what = e.args[0] if isinstance(e.args[0], tuple) else ("?", str(e))
        raise ScenarioError(f"events[{i}] ({ev.kind}) field {fld!r}: {what}") from None
    return ev


@dataclass
class Scenario:
    """A named timeline. `positions`: users' positions (metres) before any move; `radio`:
    the mobility model's constants (testbed.mobility.Radio)."""

    events: list[Event]
    name: str = "scenario"
    description: str = ""
    positions: dict[str, tuple[float, float]] = field(default_factory=dict)
    radio: Radio = field(default_factory=Radio)
    path: str | None = None
    # The client the server follows on handover (testbed.migration.serving_edge); None: the
    # cell most clients are in.
    follow: str | None = None

    def __post_init__(self) -> None:
        for i, ev in enumerate(self.events):
            if not isinstance(ev, Event) or not ev.kind:
                raise ScenarioError(f"events[{i}]: expected an Event (Move, SetLink, ...), "
                                    f"got {ev!r}")
            check_event(i, ev)
        for user, p in list(self.positions.items()):
            try:
                self.positions[user] = _point(p, user)
            except ValueError as e:
                raise ScenarioError(f"positions field {user!r}: {e.args[0][1]}") from None

    @classmethod
    def from_dict(cls, d: Any, path: str | None = None) -> Scenario:
        where = path or "scenario"
        if not isinstance(d, dict):
            raise ScenarioError(f"{where}: expected a mapping with 'events', got "
                                f"{type(d).__name__}")
        known = ("name", "description", "events", "positions", "radio", "follow")
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ScenarioError(f"{where} field {unknown[0]!r}: unknown; valid: {list(known)}")
        evs = d.get("events")
        if not isinstance(evs, list):
            raise ScenarioError(f"{where} field 'events': expected a list of events, got {evs!r}")
        base = os.path.dirname(os.path.abspath(path)) if path else "."
        events = [event_from_dict(i, e, base) for i, e in enumerate(evs)]
        positions = d.get("positions") or {}
        if not isinstance(positions, dict):
            raise ScenarioError(f"{where} field 'positions': expected user -> [x, y]")
        try:
            radio = Radio.from_dict(d.get("radio") or {})
        except ValueError as e:
            raise ScenarioError(f"{where} field 'radio': {e}") from None
        return cls(events=events, name=str(d.get("name", "scenario")),
                   description=str(d.get("description", "")), positions=positions,
                   radio=radio, path=path, follow=d.get("follow"))

    @classmethod
    def load(cls, path: str) -> Scenario:
        try:
            with open(path) as f:
                d = yaml.safe_load(f)
        except OSError as e:
            raise ScenarioError(f"scenario {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ScenarioError(f"scenario {path}: not valid YAML: {e}") from None
        return cls.from_dict(d, path)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "path": self.path,
                "positions": {u: list(p) for u, p in self.positions.items()},
                "radio": self.radio.to_dict(), "follow": self.follow,
                "events": [e.to_dict() for e in self.events]}

    def check(self, topo: Any, reactions: dict[str, Reaction], rounds: int | None = None,
              shaped: Callable[[str, str], bool] | None = None) -> None:
        """Everything that can be known before the network is built: hosts and links exist
        (link events need a shaped link: `shaped(a, b)`, default: declared with link
        parameters), round triggers within the run, and a reaction for every kind that needs
        one. Raises ScenarioError naming the event and field."""
        nodes = set(topo.nodes())
        hosts = set(topo.hosts())
        declared = {frozenset((a, b)): info for a, b, info in topo.links(withInfo=True)}
        shaped = shaped or (lambda a, b: bool(shaping_params(declared[frozenset((a, b))])))
        cells = {bs.cell for bs in base_stations(topo)}
        for i, ev in enumerate(self.events):
            def bad(fld: str, what: str, ev: Event = ev, i: int = i) -> ScenarioError:
                return ScenarioError(f"events[{i}] ({ev.kind}) field {fld!r}: {what}")

            if ev.kind in NEEDS_REACTION and ev.kind not in reactions:
                raise bad("kind", f"no reaction registered for {ev.kind!r} events (registered: "
                                  f"{sorted(reactions) or 'none'}); see docs/scenarios.md")
            trig, v = ev.trigger()
            if rounds is not None and trig != "at" and v > rounds:
                raise bad(trig, f"round {v} is after the run's last round ({rounds})")
            if isinstance(ev, LinkEvent):
                a, b = ev.link
                if frozenset(ev.link) not in declared:
                    raise bad("link", f"no topology link {a}-{b}")
                if not shaped(a, b):
                    raise bad("link", f"{a}-{b} is not a shaped link (declare link parameters "
                                      f"on it in the topology)")
            for fld in ("user", "node"):
                if getattr(ev, fld, None) is not None and ev.__dict__[fld] not in hosts:
                    raise bad(fld, f"no host {getattr(ev, fld)!r} in the topology")
            if isinstance(ev, (Move, Handover)) and not cells:
                raise bad("kind", "the topology has no base stations (nodes tagged pos= and "
                                  "cell=, e.g. topologies/cellular.py)")
            if isinstance(ev, Handover) and ev.cell not in cells:
                raise bad("cell", f"no cell {ev.cell}; cells: {sorted(cells)}")
        for user in self.positions:
            if user not in nodes:
                raise ScenarioError(f"positions field {user!r}: no such host")
        if self.follow is not None and self.follow not in hosts:
            raise ScenarioError(f"field 'follow': no host {self.follow!r} in the topology")


# -- applying link changes ----------------------------------------------------------------------
class RecordingBackend(LinkBackend):
    """The link model without a network: what the links would be (dry runs, loopback runs)."""

    name = "recording"

    def prepare(self, topo: Any) -> Any:
        for a, b, info in topo.links(sort=True, withInfo=True):
            p = LinkParams.from_mininet(**shaping_params(info))
            self.declared.append((a, b, p))
            self.params[(a, b)] = p
        return topo

    def apply(self, key: tuple[str, str], params: LinkParams) -> None:
        pass

    def set_status(self, key: tuple[str, str], up: bool) -> None:
        pass


class LinkOps:
    """Applies link changes to a network's link backend and, when there is one, lets the
    controller re-route; returns what was done and how long it took (apply_s, reroute_s)."""

    def __init__(self, backend: LinkBackend, controller: Any = None, applied: bool = True
                 ) -> None:
        self.backend, self.controller, self.applied = backend, controller, applied
        self.last: tuple[dict[str, list[str]], float] = ({}, 0.0)

    def _paths(self) -> dict[str, list[str]]:
        st = getattr(self.controller, "state", None) or {}
        return {k: v["path"] for k, v in st.get("paths", {}).items()}

    def _do(self, a: str, b: str, change: Callable[[], Any], status: bool | None
            ) -> dict[str, Any]:
        before = self._paths()
        t0 = time.perf_counter()
        change()
        t1 = time.perf_counter()
        out: dict[str, Any] = {"applied": self.applied, "apply_s": t1 - t0}
        self.last = (before, t0)  # for first_traffic
        if self.controller is not None:
            if status is False:
                self.controller.down.add(frozenset((a, b)))
            elif status is True:
                self.controller.down.discard(frozenset((a, b)))
            echo, self.controller.echo = self.controller.echo, lambda _: None
            try:  # the routes are printed when they change, not at every mobility sample
                self.controller.recompute()
            finally:
                self.controller.echo = echo
            out["reroute_s"] = time.perf_counter() - t1
            after = self._paths()
            changed = {k: after.get(k) for k in set(before) | set(after)
                       if before.get(k) != after.get(k)}
            if changed:
                out["paths_changed"] = dict(sorted(changed.items()))
                self.controller._print_routes()
            lost = self.controller.state.get("unreachable") or []
            if lost:
                out["unreachable"] = lost
        return out

    def first_traffic(self, before: dict[str, list[str]], t_change: float,
                      timeout_s: float = 5.0, min_bytes: int = 1000) -> dict[str, Any]:
        """After a re-route: seconds from `t_change` (perf_counter) until the first data
        (`min_bytes`, more than an ARP) leaves on a hop the new paths use and the old ones
        (`before`) did not, read from the kernel counters of that hop's interface."""
        from testbed.network import read_net_dev

        now = self._paths()
        hops = {(x, y) for k, p in now.items() for x, y in zip(p, p[1:], strict=False)
                if (x, y) not in set(zip(before.get(k, []), before.get(k, [])[1:],
                                         strict=False))}
        net = getattr(self.controller.network, "net", None)
        watch = [(net.get(x).pid, self.controller.intfs[(x, y)], f"{x}->{y}")
                 for x, y in sorted(hops) if (x, y) in self.controller.intfs]
        if not watch:
            return {"new_hops": [], "traffic_s": None}

        def tx() -> dict[str, int]:
            return {h: read_net_dev(f"/proc/{pid}/net/dev").get(i, {}).get("tx_bytes", 0)
                    for pid, i, h in watch}

        base = tx()
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            moved = {h: b - base[h] for h, b in tx().items() if b - base[h] >= min_bytes}
            if moved:
                return {"new_hops": [h for _, _, h in watch], "first_hop": min(moved),
                        "traffic_s": time.perf_counter() - t_change}
            time.sleep(0.002)
        return {"new_hops": [h for _, _, h in watch], "traffic_s": None,
                "note": f"no data on the new hops within {timeout_s:g}s"}

    def set_link(self, a: str, b: str, **params: Any) -> dict[str, Any]:
        box: dict[str, LinkParams] = {}
        out = self._do(a, b, lambda: box.setdefault("p", self.backend.set_link(a, b, **params)),
                       None)
        return {"state": box["p"].to_dict(), **out}

    def link_down(self, a: str, b: str) -> dict[str, Any]:
        return {"state": "down", **self._do(a, b, lambda: self.backend.link_down(a, b), False)}

    def link_up(self, a: str, b: str) -> dict[str, Any]:
        return {"state": "up", **self._do(a, b, lambda: self.backend.link_up(a, b), True)}


def record_line(rec: dict[str, Any]) -> str | None:
    """One console line for an event, reroute or skipped record (None for the others)."""
    kind, t = rec.get("kind"), rec.get("t", 0.0)
    if kind == "event":
        what = " ".join(f"{k}={v}" for k, v in rec.items() if k in (
            "link", "user", "cell", "node", "to", "params", "file", "cause"))
        return (f"t={t:.2f}s round {rec.get('round')} ({rec.get('phase')}): "
                f"events[{rec.get('event')}] {rec.get('type')} {what}")
    if kind == "reroute":
        traffic = rec.get("traffic_s")
        return (f"re-routed after {rec.get('by')} {rec.get('link')}: routes in "
                f"{rec.get('routes_s', 0) * 1000:.0f} ms, data on the new path after "
                + (f"{traffic * 1000:.0f} ms" if traffic is not None else "(none seen)"))
    if kind == "skipped":
        return f"not reached: {rec.get('what')} due at {rec.get('due_s'):g}s ({rec.get('reason')})"
    return None


def link_ops(network: Any, topo: Any, controller: Any = None) -> LinkOps:
    """The LinkOps of a built network: its link backend and controller. The loopback network
    shapes nothing: the link model is tracked (and logged as not applied)."""
    if getattr(network, "kind", None) == "mininet":
        return LinkOps(network.links, controller)
    backend = RecordingBackend()
    backend.prepare(topo)
    return LinkOps(backend, applied=False)


# -- the engine ---------------------------------------------------------------------------------
class ScenarioRunner:
    """Fires a scenario's events. The experiment calls `before_round(n)` / `after_round(n)`
    on its main thread and `start_timer()` once round 1 is about to start; time-triggered events
    (and the samples of a move, the rows of a trace) then run on a timer thread. Everything
    runs under `lock` (the experiment's event lock), one event at a time. `log(record)` writes
    each event, reaction and link state (testbed.experiment: events.jsonl and the round's
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
        self.phase = "during_round"
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
        end = n * round_s
        while runner._queue and runner._queue[0][0] <= end:
            clock["t"] = runner._queue[0][0]
            runner.run_due(clock["t"])
        clock["t"] = end
        runner.after_round(n)
    runner.finish()
    return runner


# -- `sledge scenario`: check a timeline and show what it would do, without a network -------------
def _state_line(rec: dict[str, Any]) -> str:
    st = rec["state"]
    if isinstance(st, str):
        return f"t={rec['t']:.2f}s {rec['link']} {st}"
    up, down = st["up"], st["down"]
    return (f"t={rec['t']:.2f}s {rec['link']} ({rec['by']}) up {up['bw_mbit']} Mbit/s "
            f"{up['delay_ms']:.4f} ms, down {down['bw_mbit']} Mbit/s {down['delay_ms']:.4f} ms")


def cmd_scenario(a: Any) -> int:
    from testbed.cli import load_topology, parse_params
    from testbed.experiment import Experiment  # noqa: F401 - registers the reactions

    topo, _ = load_topology(a.topology, a.topo, parse_params(a.topo_param, "-p"))
    try:
        sc = Scenario.load(a.scenario)
        sc.check(topo, REACTIONS, a.rounds)
    except ScenarioError as e:  # bad input: one line on stderr, exit 2 (testbed.cli.main)
        from testbed.config import ConfigError

        raise ConfigError(f"scenario: {e}") from e

    def show(rec: dict[str, Any]) -> None:
        line = _state_line(rec) if rec["kind"] == "link_state" else record_line(rec)
        if line:
            print(line)

    print(f"scenario {sc.name}: {len(sc.events)} events; rounds of {a.round_s:g} s (virtual), "
          f"seed {a.seed}; reactions not run")
    runner = simulate(sc, topo, seed=a.seed, rounds=a.rounds, round_s=a.round_s, log=show)
    print(f"{len(runner.link_states)} link states")
    return 0


def add_parser(sub: Any) -> None:
    """`sledge scenario` on the CLI's subparsers."""
    p = sub.add_parser("scenario", help="check a scenario against a topology and print the link "
                                        "states it would apply (no network, no root)")
    p.add_argument("scenario", help="scenario YAML, e.g. scenarios/mesh_link_cut.yaml")
    p.add_argument("topology", help="topology script")
    p.add_argument("--topo", help="topology name inside the script (default: its first)")
    p.add_argument("-p", "--topo-param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-s", type=float, default=5.0, help="virtual seconds per round")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_scenario)
