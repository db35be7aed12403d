"""The analytic latency model of algorithms.md 11: per scheme and cut, seconds per iteration.

Division of labour. `Profile` is what the model knows of a network: per-unit forward FLOPs
(2 x MACs, 11.1), output sizes and parameters, measured from the real PyTorch model
(nodes.models.unit_stats). `Path` is one client's route in one direction: a rate and a one-way
delay. `Setup` is the devices and paths of one round. The scheme functions (`psl_epsl` for 6.3,
`sflv1` / `sflv2` / `sfl_aggregation` for 11.4, `vanilla_sl` 11.5, `ushaped` 11.6,
`hierarchical` 11.7) are the spec's formulas and nothing else: they return each phase and the
`total`. `setup_from_topology` reads a Mininet topology (links as declared, routes as the
controller would choose them) into a Setup; `predict` dispatches on a run's scheme.

Conventions: compute t = FLOPs / (eta * f) with f in cycles/s; backward = beta x forward;
transfer t = bits / rate + one-way delay (11.1, "add Mininet link delay if configured");
a cut index l counts client units (cut after unit l, 1-based as in section 13).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any

N0_W_PER_HZ = 10 ** ((-174 - 30) / 10)  # -174 dBm/Hz (section 12 defaults)


# -- building blocks (11.1) --------------------------------------------------------------------
def t_comp(flops: float, f: float, eta: float = 1.0) -> float:
    """Seconds to compute `flops` at f cycles/s and eta FLOPs/cycle."""
    return flops / (eta * f)


def shannon_rate(bandwidth_hz: float, power_w: float, gain: float,
                 n0: float = N0_W_PER_HZ) -> float:
    """R(B, p, g) = B log2(1 + p g / (N0 B)), bit/s."""
    return bandwidth_hz * math.log2(1 + power_w * gain / (n0 * bandwidth_hz))


def path_gain(distance_m: float) -> float:
    """Linear gain of the 128.1 + 37.6 log10(d_km) dB path loss (section 12 defaults)."""
    return 10 ** (-(128.1 + 37.6 * math.log10(distance_m / 1000)) / 10)


@dataclass(frozen=True)
class Path:
    """One direction of a client's route: bottleneck rate (bit/s) and one-way delay (s)."""

    rate_bps: float
    delay_s: float = 0.0

    def time(self, bits: float) -> float:
        return bits / self.rate_bps + self.delay_s


@dataclass(frozen=True)
class Profile:
    """Per-sample costs of a model's units: forward FLOPs, output elements, parameters."""

    names: tuple[str, ...]
    fwd_flops: tuple[float, ...]
    out_elems: tuple[int, ...]
    params: tuple[int, ...]

    @classmethod
    def from_stats(cls, stats: Sequence[Any]) -> Profile:
        """From nodes.models.unit_stats: FLOPs = 2 x MACs (11.1)."""
        return cls(tuple(u.name for u in stats), tuple(2.0 * u.macs for u in stats),
                   tuple(u.out_elems for u in stats), tuple(u.params for u in stats))

    @classmethod
    def of(cls, model: str, dataset: str, **kw: Any) -> Profile:
        """The profile of model `model` built for data set `dataset` (as a run builds it)."""
        from nodes.data import dataset_info
        from nodes.models import build_model, unit_stats

        info = dataset_info(dataset)
        m = build_model(model, num_classes=info["num_classes"], in_channels=info["in_channels"],
                        image_size=info["image_size"], **kw)
        return cls.from_stats(unit_stats(m, (info["in_channels"], info["image_size"],
                                             info["image_size"])))

    @property
    def units(self) -> int:
        return len(self.names)

    def cut(self, name: str) -> int:
        """Cut index l of a cut point name (client runs units 1..l)."""
        if name not in self.names[:-1]:
            raise ValueError(f"cut {name!r} is not a cut point; valid: {list(self.names[:-1])}")
        return self.names.index(name) + 1

    def flops(self, a: int, b: int) -> float:
        """Forward FLOPs per sample of units a+1..b."""
        return sum(self.fwd_flops[a:b])

    def act_bits(self, l: int, q: float = 32) -> float:  # noqa: E741 - the spec's symbol
        """S_a(l): bits per sample of the activation after unit l."""
        return self.out_elems[l - 1] * q

    def weight_bits(self, l: int, q: float = 32) -> float:  # noqa: E741
        """S_w(l): bits of the client-side model units 1..l."""
        return sum(self.params[:l]) * q


@dataclass(frozen=True)
class Client:
    f: float           # cycles/s
    up: Path
    down: Path


@dataclass(frozen=True)
class Setup:
    """One round's devices and paths; the section 12 defaults for the rest."""

    clients: tuple[Client, ...]
    f_server: float
    batch: int = 16
    eta: float = 1.0
    beta: float = 2.0
    s_y: float = 64.0          # label bits per sample (int64)
    q: float = 32.0            # bits per activation / gradient / weight element
    bcast: Path | None = None  # R^BC: None = the slowest client's downlink

    def with_paths(self, up: Sequence[Path], down: Sequence[Path]) -> Setup:
        return replace(self, clients=tuple(replace(c, up=u, down=d) for c, u, d in
                                           zip(self.clients, up, down, strict=True)))


def _client_parts(p: Profile, s: Setup, l: int) -> list[dict[str, float]]:  # noqa: E741
    fc = p.flops(0, l)
    return [{"cF": t_comp(s.batch * fc, c.f, s.eta),
             "U": c.up.time(s.batch * (p.act_bits(l, s.q) + s.s_y)),
             "D": c.down.time(s.batch * p.act_bits(l, s.q)),
             "cB": t_comp(s.beta * s.batch * fc, c.f, s.eta)} for c in s.clients]


# -- PSL / EPSL (6.3, 11.3) --------------------------------------------------------------------
def psl_epsl(p: Profile, s: Setup, l: int, phi: float = 0.0) -> dict[str, float]:  # noqa: E741
    """T_EPSL(phi, l) = max_i(cF + U) + sF + sB + max_i(D + cB); phi = 0 is PSL."""
    n, b, fs = len(s.clients), s.batch, p.flops(l, p.units)
    parts = _client_parts(p, s, l)
    bcast = s.bcast or min((c.down for c in s.clients), key=lambda d: d.rate_bps)
    sg = b * p.act_bits(l, s.q)
    up = max(c["cF"] + c["U"] for c in parts)
    s_f = t_comp(n * b * fs, s.f_server, s.eta)
    s_b = t_comp(b * (phi + n * (1 - phi)) * s.beta * fs, s.f_server, s.eta)
    # The broadcast share goes once over R^BC; the unicast share over each client's own path.
    down = max((bcast.time(phi * sg) if phi else 0.0)
               + ((c.down.time((1 - phi) * sg)) if phi < 1 else 0.0) + pc["cB"]
               for c, pc in zip(s.clients, parts, strict=True))
    return {"up": up, "server_f": s_f, "server_b": s_b, "down": down,
            "total": up + s_f + s_b + down}


# -- SFL (11.4) --------------------------------------------------------------------------------
def sflv1(p: Profile, s: Setup, l: int) -> dict[str, float]:  # noqa: E741
    """V1: PSL's phases, with the server computing N per-client copies serially."""
    n, fs = len(s.clients), p.flops(l, p.units)
    parts = _client_parts(p, s, l)
    up = max(c["cF"] + c["U"] for c in parts)
    srv = t_comp(n * s.batch * (1 + s.beta) * fs, s.f_server, s.eta)
    down = max(c["D"] + c["cB"] for c in parts)
    return {"up": up, "server": srv, "down": down, "total": up + srv + down}


def sflv2(p: Profile, s: Setup, l: int,  # noqa: E741
          order: Sequence[int] | None = None) -> dict[str, float]:
    """V2: a sequential server in `order` (default: first come, first served)."""
    parts = _client_parts(p, s, l)
    arrive = [c["cF"] + c["U"] for c in parts]
    order = sorted(range(len(parts)), key=arrive.__getitem__) if order is None else order
    per = t_comp(s.batch * (1 + s.beta) * p.flops(l, p.units), s.f_server, s.eta)
    finish, end = 0.0, 0.0
    for k in order:
        finish = max(finish, arrive[k]) + per
        end = max(end, finish + parts[k]["D"] + parts[k]["cB"])
    return {"server_done": finish, "total": end}


def sfl_aggregation(p: Profile, s: Setup, l: int) -> float:  # noqa: E741
    """T_agg = max_i S_w/R_i^U + S_w/R^BC, once per aggregation period."""
    sw = p.weight_bits(l, s.q)
    bcast = s.bcast or min((c.down for c in s.clients), key=lambda d: d.rate_bps)
    return max(c.up.time(sw) for c in s.clients) + bcast.time(sw)


# -- vanilla SL (11.5) and U-shaped (11.6) ------------------------------------------------------
def vanilla_sl(p: Profile, s: Setup, l: int, batches: int = 1) -> dict[str, float]:  # noqa: E741
    """T_SL = sum_k [n_k (cF + U + server F+B + D + cB) + T_handoff(k)], centralized hand-off
    (S_w up from client k, down to client k+1); paths as given (the whole band: one client
    is active at a time)."""
    parts = _client_parts(p, s, l)
    srv = t_comp(s.batch * (1 + s.beta) * p.flops(l, p.units), s.f_server, s.eta)
    sw = p.weight_bits(l, s.q)
    n = len(parts)
    train = sum(batches * (c["cF"] + c["U"] + srv + c["D"] + c["cB"]) for c in parts)
    handoff = sum(s.clients[k].up.time(sw) + (s.clients[k + 1].down.time(sw) if k + 1 < n
                                              else 0.0) for k in range(n))
    return {"train": train, "handoff": handoff, "total": train + handoff}


def ushaped(p: Profile, s: Setup, l1: int, l2: int, client: int = 0) -> dict[str, float]:
    """One batch of one active client: head F, A1 up, body F, A2 down, tail F+B, G2 up,
    body B, G1 down, head B."""
    c, b, q = s.clients[client], s.batch, s.q
    head, body, tail = p.flops(0, l1), p.flops(l1, l2), p.flops(l2, p.units)
    comp_c = t_comp(b * (head + (1 + s.beta) * tail + s.beta * head), c.f, s.eta)
    comp_s = t_comp(b * (1 + s.beta) * body, s.f_server, s.eta)
    comm = (c.up.time(b * p.act_bits(l1, q)) + c.down.time(b * p.act_bits(l2, q))
            + c.up.time(b * p.act_bits(l2, q)) + c.down.time(b * p.act_bits(l1, q)))
    return {"client": comp_c, "server": comp_s, "comm": comm, "total": comp_c + comp_s + comm}


# -- hierarchical user-edge-cloud (11.7) --------------------------------------------------------
def hierarchical(p: Profile, s: Setup, l1: int, l2: int, f_cloud: float,
                 ec_up: Path, ec_down: Path) -> dict[str, float]:
    """T_hier(l1, l2) for PSL-style parallel users; s.f_server is the edge. l2 = units: no
    cloud (user-edge); l2 = l1: the edge only relays (user-cloud)."""
    n, b = len(s.clients), s.batch
    parts = _client_parts(p, s, l1)
    users = max(c["cF"] + c["U"] for c in parts)
    down = max(c["D"] + c["cB"] for c in parts)
    edge = t_comp((1 + s.beta) * n * b * p.flops(l1, l2), s.f_server, s.eta)
    cloud = l2 < p.units
    ec = (ec_up.time(n * b * (p.act_bits(l2, s.q) + s.s_y))
          + ec_down.time(n * b * p.act_bits(l2, s.q))) if cloud else 0.0
    cl = t_comp((1 + s.beta) * n * b * p.flops(l2, p.units), f_cloud, s.eta)
    return {"users": users, "edge": edge, "edge_cloud": ec, "cloud": cl, "down": down,
            "total": users + edge + ec + cl + down}


# -- topologies and runs -----------------------------------------------------------------------
@dataclass
class Route:
    """A client's hops to the server and back (directed (u, v) pairs)."""

    up: list[tuple[str, str]]
    down: list[tuple[str, str]]


@dataclass
class Network:
    """A topology as the latency model sees it: directed link capacities (bit/s) and delays
    (s), the clients' routes, and which clients share each hop."""

    capacity: dict[tuple[str, str], float]
    delay: dict[tuple[str, str], float]
    routes: dict[str, Route]
    server: str
    users: dict[tuple[str, str], list[str]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for c, r in self.routes.items():
            for hop in (*r.up, *r.down):
                self.users.setdefault(hop, []).append(c)

    def shared(self) -> dict[tuple[str, str], list[str]]:
        """Finite-capacity hops that more than one client crosses (e.g. a cell)."""
        return {h: u for h, u in self.users.items()
                if len(u) > 1 and math.isfinite(self.capacity[h])}

    def paths(self, shares: Mapping[tuple[str, str], Mapping[str, float]] | None = None
              ) -> tuple[list[Path], list[Path]]:
        """Each client's up and down Path: bottleneck of its hops, a hop of capacity C
        shared by k clients giving each C * share (default 1/k: an equal split)."""
        shares = shares or {}

        def path(c: str, hops: list[tuple[str, str]]) -> Path:
            rate = min((self.capacity[h] * shares.get(h, {}).get(c, 1 / len(self.users[h]))
                        for h in hops), default=math.inf)
            return Path(rate, sum(self.delay[h] for h in hops))

        cl = list(self.routes)
        return ([path(c, self.routes[c].up) for c in cl],
                [path(c, self.routes[c].down) for c in cl])


def network_of(topo: Any, clients: Sequence[str], server: str) -> Network:
    """Capacities, delays and the controller's widest-path routes of an unbuilt topology."""
    from testbed.emu.routing import graph_from_topo, path_of, route_tree

    g = graph_from_topo(topo)
    cap = {(u, v): d["bw"] * 1e6 for u, v, d in g.edges(data=True)}
    delay = {(u, v): d["delay"] / 1e3 for u, v, d in g.edges(data=True)}
    to_srv = route_tree(g, server)
    routes = {}
    for c in clients:
        routes[c] = Route(list(pairwise(path_of(to_srv, c, server))),
                          list(pairwise(path_of(route_tree(g, c), server, c))))
    return Network(cap, delay, routes, server)


def setup_of(net: Network, cycles: Mapping[str, float], *, batch: int, eta: float = 1.0,
             beta: float = 2.0, shares: Mapping[tuple[str, str], Mapping[str, float]]
             | None = None) -> Setup:
    """The Setup of a round on `net` with each host's modelled cycles/s."""
    missing = [h for h in (*net.routes, net.server) if h not in cycles]
    if missing:
        raise ValueError(f"latency model: no cycles/s for host(s) {missing} (config 'cycles')")
    up, down = net.paths(shares)
    clients = tuple(Client(cycles[c], u, d) for c, u, d in zip(net.routes, up, down,
                                                                strict=True))
    return Setup(clients, cycles[net.server], batch=batch, eta=eta, beta=beta)


# The models a scheme may name (nodes.schemes.base.Scheme.latency_model), each from a run's cuts.
MODELS: dict[str, Callable[..., dict[str, float]]] = {
    "psl_epsl": lambda p, s, ls, **kw: psl_epsl(p, s, ls[0], **kw),
    "sflv1": lambda p, s, ls, **kw: sflv1(p, s, ls[0], **kw),
    "sflv2": lambda p, s, ls, **kw: sflv2(p, s, ls[0], **kw),
    "vanilla_sl": lambda p, s, ls, **kw: vanilla_sl(p, s, ls[0], **kw),
    "ushaped": lambda p, s, ls, **kw: ushaped(p, s, ls[0], ls[-1], **kw),
}


def model_of(scheme: str, options: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The analytic model a scheme (a run's scheme name and options) says prices it."""
    from nodes.schemes import get_scheme

    model = get_scheme(scheme, **options).latency_model()
    if model is None or model[0] not in MODELS:
        raise ValueError(f"latency model: scheme {scheme!r} has no section-11 model (schemes "
                         f"that have one: {schemes_with_model()})")
    return model


def schemes_with_model() -> list[str]:
    from nodes.schemes import REGISTRY

    return sorted(n for n, cls in REGISTRY.items() if cls.latency)


def predict(scheme: str, options: Mapping[str, Any], p: Profile, s: Setup,
            cuts: Sequence[str]) -> dict[str, float]:
    """Seconds per iteration of `scheme` (a run's scheme name and options) at `cuts`."""
    ls = [p.cut(c) for c in cuts]
    name, params = model_of(scheme, options)
    return MODELS[name](p, s, ls, **params)
