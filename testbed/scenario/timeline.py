"""Scenario timelines: what happens to the network and the nodes while a run trains.

Division of labour. This module is the timeline and its engine: `Scenario` (plain dataclasses,
loaded from YAML with errors that name the event and the field), `ScenarioRunner` (fires each
event at its trigger: a time in seconds since round 1 started, on a timer thread, or a round
boundary, on the experiment's main thread) and the reaction registry (`REACTIONS`, `register`).
testbed.plan.mobility turns positions into link states and handovers; the experiment
(testbed.run.experiment) owns the network and the nodes; the link events go through `LinkOps`, which
applies them to the emulated links and lets the controller re-route (testbed.emu.routing).

Events the runner carries out itself: move, set_link, trace, link_down, link_up. Events it
hands to the registry: handover (testbed.scenario.migration), kill, restart, add_client,
remove_client
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

import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from testbed.emu.linkmodel import LinkParams
from testbed.emu.links import load_trace, shaping_params
from testbed.errors import read_yaml
from testbed.plan.mobility import Radio, base_stations


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
    """`user` hands over to cell `cell` (reaction: testbed.scenario.migration)."""

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
    """Replay a CSV bandwidth trace on the link (testbed.emu.links.load_trace: a `time_s` column,
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
    """Take the link down, both directions at once; the controller re-routes the pairs whose
    path used it (a pair with no other path is reported unreachable)."""

    kind: ClassVar[str] = "link_down"


@dataclass(kw_only=True)
class LinkUp(LinkEvent):
    """Bring the link back up with the parameters it had when it went down; the controller's
    routes may return to it."""

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
    """Stop the node gracefully: recovery restarts it from its last checkpoint."""

    kind: ClassVar[str] = "restart"


@dataclass(kw_only=True)
class AddClient(NodeEvent):
    """The client takes part again from the next round."""

    kind: ClassVar[str] = "add_client"


@dataclass(kw_only=True)
class RemoveClient(NodeEvent):
    """The client sits out from the next round (its process and state are kept)."""

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
    the mobility model's constants (testbed.plan.mobility.Radio)."""

    events: list[Event]
    name: str = "scenario"
    description: str = ""
    positions: dict[str, tuple[float, float]] = field(default_factory=dict)
    radio: Radio = field(default_factory=Radio)
    path: str | None = None
    # The client the server follows on handover (testbed.scenario.migration.serving_edge); None: the
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
        return cls.from_dict(read_yaml(path, "scenario", ScenarioError), path)

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
