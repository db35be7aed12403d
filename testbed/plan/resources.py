"""Resource manager: the cut layer and each client's share of a shared cell, chosen to minimise
the per-round latency of testbed.plan.latency (EPSL's block-coordinate descent, algorithms.md 6.4).

Division of labour. testbed.plan.latency says what a round costs for given paths; this module
chooses the paths' shares and the cut, and makes the choice real on a built network:
- `min_max_shares`: the bandwidth block, exact. Mininet links are frequency-flat, so 6.4's
  "frequency-flat variant" applies: bisection on the round time T for the least T at which the
  rates each client needs, r_i(T) = bits_i / (T - fixed_i), fit every shared hop (sum of
  r_i / C_h <= 1) and every client's own hops. Uplink and downlink are separate problems
  (PSL/EPSL's T is max(up) + server + max(down)). There is no power block: an emulated link
  has a rate, not a transmit power and an SNR.
- `allocate`: BCD over (shares, cut) as 6.4 lists it: equal shares -> best cut -> shares ->
  cut ... until T improves by < 1e-3 (relative) or 20 iterations; plus `exhaustive`: the exact
  shares for every cut, the global optimum (the cut set is small), which BCD is checked against.
- Server compute: PSL and EPSL servers run one concatenated batch per iteration and the other
  schemes' servers one client batch at a time, so no scheme the testbed runs has concurrent
  per-client server work to divide; the whole server goes to the round (`server_share` = 1 is
  the optimum of this model) and a run applies it as the server's modelled cycles.
- `fluid_finish`: the on-demand mode, in which a client's share is not reserved while it
  computes: at each instant the clients that are transmitting split the hop's capacity in
  proportion to their weights (work-conserving weighted sharing). Every client then gets at
  least its static share at all times, so no client finishes later than under static shares.
- `shape_access_links` / `apply`: per-client shares of a cell become per-client rate limits on
  each client's own access link (shaped before the network is built, so the link backend has
  a shaper there; set to the allocation with Network.set_link once it runs). The cell link
  keeps its capacity and delay; the shares sum to at most 1, so it never queues.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from testbed.plan.latency import Network, Profile, Setup, model_of, psl_epsl, setup_of

Hop = tuple[str, str]
Shares = dict[Hop, dict[str, float]]


def min_max_shares(fixed: Sequence[float], bits: Sequence[float], delay: Sequence[float],
                   hops: Sequence[Sequence[Hop]], capacity: Mapping[Hop, float],
                   tol: float = 1e-9) -> tuple[float, list[float]]:
    """min over rates of max_i(fixed_i + bits_i / rate_i + delay_i), where client i's rate
    crosses `hops[i]` and each hop's rates sum to at most its capacity. Returns (T, rates)."""
    n = len(fixed)
    base = [fixed[i] + delay[i] for i in range(n)]
    if not any(bits):
        return max(base), [math.inf] * n

    def need(t: float) -> list[float] | None:
        rates = []
        for i in range(n):
            if bits[i] == 0:
                rates.append(0.0)
                continue
            if t <= base[i]:
                return None
            rates.append(bits[i] / (t - base[i]))
        load: dict[Hop, float] = {}
        for i, r in enumerate(rates):
            for h in hops[i]:
                load[h] = load.get(h, 0.0) + r
        return rates if all(load[h] <= capacity[h] * (1 + 1e-12) for h in load) else None

    lo = max(base)
    hi = lo + 1.0
    while need(hi) is None:
        hi = lo + 2 * (hi - lo)
    while hi - lo > tol * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if need(mid) is not None else (mid, hi)
    return hi, need(hi)


def shares_from_rates(rates: Sequence[float], clients: Sequence[str],
                      hops: Sequence[Sequence[Hop]], capacity: Mapping[Hop, float],
                      shared: Mapping[Hop, Sequence[str]]) -> Shares:
    """Shares of each shared hop: the rates found, scaled up to use the whole hop (a client
    never does worse with more)."""
    out: Shares = {}
    for h, users in shared.items():
        need = {c: rates[clients.index(c)] / capacity[h] for c in users
                if h in hops[clients.index(c)]}
        total = sum(v for v in need.values() if math.isfinite(v))
        out[h] = ({c: v / total for c, v in need.items()} if total > 0
                  else {c: 1 / len(need) for c in need})
    return out


@dataclass
class Allocation:
    cut: str
    shares: Shares
    latency: dict[str, float]              # the model's phases at this allocation
    history: list[tuple[str, float]] = field(default_factory=list)  # (block, T) of BCD
    per_cut: dict[str, float] = field(default_factory=dict)         # T with optimal shares

    def rates(self, net: Network) -> dict[str, tuple[float, float]]:
        """client -> (up, down) bit/s the allocation gives it at its shared hops."""
        up, down = net.paths(self.shares)
        return {c: (u.rate_bps, d.rate_bps) for c, u, d in zip(net.routes, up, down,
                                                                strict=True)}

    def to_dict(self) -> dict[str, Any]:
        return {"cut": self.cut, "latency": self.latency, "history": self.history,
                "per_cut": self.per_cut,
                "shares": {f"{a}->{b}": s for (a, b), s in self.shares.items()}}


class Manager:
    """Cut and shares for PSL/EPSL rounds on `net` (testbed.plan.latency.Network)."""

    def __init__(self, net: Network, profile: Profile, cycles: Mapping[str, float], *,
                 batch: int, eta: float = 1.0, beta: float = 2.0, phi: float = 0.0,
                 cuts: Sequence[str] | None = None) -> None:
        self.net, self.p, self.cycles, self.phi = net, profile, cycles, phi
        self.kw = {"batch": batch, "eta": eta, "beta": beta}
        self.cuts = list(cuts or profile.names[:-1])
        self.clients = list(net.routes)
        self.shared = net.shared()
        # R^BC (6.3): the whole band to every client, limited by the worst one; no share.
        _, full = net.paths({h: dict.fromkeys(u, 1.0) for h, u in self.shared.items()})
        self.bcast = min(full, key=lambda d: d.rate_bps)

    def setup(self, shares: Shares | None) -> Setup:
        return replace(setup_of(self.net, self.cycles, shares=shares, **self.kw),
                       bcast=self.bcast)

    def latency(self, cut: str, shares: Shares | None) -> dict[str, float]:
        return psl_epsl(self.p, self.setup(shares), self.p.cut(cut), self.phi)

    def best_shares(self, cut: str) -> tuple[float, Shares]:
        """The bandwidth block for a fixed cut: exact min-max shares, up and down."""
        s, l, b = self.setup(None), self.p.cut(cut), self.kw["batch"]  # noqa: E741
        comp = [c.f * s.eta for c in s.clients]
        fc, sg = self.p.flops(0, l), b * self.p.act_bits(l)
        bc = self.bcast.time(self.phi * sg) if self.phi else 0.0
        shares: Shares = {}
        for direction, bits, fixed in (
                ("up", b * (self.p.act_bits(l) + s.s_y), [b * fc / x for x in comp]),
                ("down", (1 - self.phi) * sg, [bc + s.beta * b * fc / x for x in comp])):
            routes = [getattr(self.net.routes[c], direction) for c in self.clients]
            hops = [[h for h in r if math.isfinite(self.net.capacity[h])] for r in routes]
            delay = [sum(self.net.delay[h] for h in r) if bits else 0.0 for r in routes]
            _, rates = min_max_shares(fixed, [bits] * len(fixed), delay, hops,
                                      self.net.capacity)
            shares.update(shares_from_rates(
                rates, self.clients, hops, self.net.capacity,
                {h: u for h, u in self.shared.items() if any(h in x for x in hops)}))
        return self.latency(cut, shares)["total"], shares

    def cell_hops(self) -> tuple[Hop, Hop]:
        """The narrowest hop the clients share, up and down (a cell), for on_demand."""
        r = self.net.routes[self.clients[0]]
        return tuple(min((h for h in self.shared if h in hops), key=self.net.capacity.get)
                     for hops in (r.up, r.down))

    def full_rates(self) -> dict[str, tuple[float, float]]:
        """client -> (up, down) bit/s with the whole of every shared hop: what a per-UE
        shaper is declared with before the allocation is set."""
        up, down = self.net.paths({h: dict.fromkeys(u, 1.0) for h, u in self.shared.items()})
        return {c: (u.rate_bps, d.rate_bps) for c, u, d in zip(self.clients, up, down,
                                                                strict=True)}

    def best_cut(self, shares: Shares | None) -> tuple[str, float]:
        t = {c: self.latency(c, shares)["total"] for c in self.cuts}
        best = min(t, key=t.get)
        return best, t[best]

    def bcd(self, eps: float = 1e-3, max_iter: int = 20) -> Allocation:
        """6.4: equal shares and the best cut for them, then the shares block and the cut
        block in turn until T improves by less than eps (relative)."""
        cut, t = self.best_cut(None)
        hist = [("init", t)]
        shares: Shares = {}
        for _ in range(max_iter):
            t_s, shares = self.best_shares(cut)
            cut, t_c = self.best_cut(shares)
            hist += [("shares", t_s), ("cut", t_c)]
            done = t - t_c < eps * t
            t = t_c
            if done:
                break
        return Allocation(cut, shares, self.latency(cut, shares), hist)

    def exhaustive(self) -> Allocation:
        """The exact shares for every cut; the global optimum of this model."""
        per = {c: self.best_shares(c) for c in self.cuts}
        cut = min(per, key=lambda c: per[c][0])
        return Allocation(cut, per[cut][1], self.latency(cut, per[cut][1]),
                          per_cut={c: v[0] for c, v in per.items()})


# -- on-demand sharing --------------------------------------------------------------------------
def fluid_finish(release: Sequence[float], bits: Sequence[float], capacity: float,
                 weights: Sequence[float] | None = None) -> list[float]:
    """Finish times of transfers on one hop of `capacity` bit/s whose active transfers split
    it in proportion to `weights` (default equal: TCP flows through one FIFO, roughly)."""
    n = len(bits)
    w = list(weights or [1.0] * n)
    left, done = list(map(float, bits)), [math.nan] * n
    t = min(release)
    while any(math.isnan(d) for d in done):
        active = [i for i in range(n) if math.isnan(done[i]) and release[i] <= t + 1e-15]
        pending = [release[i] for i in range(n) if math.isnan(done[i]) and release[i] > t]
        if not active:
            t = min(pending)
            continue
        total = sum(w[i] for i in active)
        rate = {i: capacity * w[i] / total for i in active}
        step = min(left[i] / rate[i] for i in active)
        if pending:
            step = min(step, min(pending) - t)
        for i in active:
            left[i] -= rate[i] * step
            if left[i] <= 1e-9 * max(bits[i], 1):
                done[i] = t + step
        t += step
    return done


def on_demand(man: Manager, cut: str, hop_up: Hop, hop_down: Hop,
              weights: Sequence[float] | None = None) -> dict[str, float]:
    """PSL/EPSL round with the clients' up and down transfers sharing one hop each (a cell)
    work-conservingly (fluid_finish), everything else as in 6.3."""
    s = man.setup(None)
    p, l, b = man.p, man.p.cut(cut), s.batch  # noqa: E741
    fc, n = p.flops(0, l), len(s.clients)
    up_delay = [sum(man.net.delay[h] for h in man.net.routes[c].up) for c in man.clients]
    dn_delay = [sum(man.net.delay[h] for h in man.net.routes[c].down) for c in man.clients]
    cf = [b * fc / (c.f * s.eta) for c in s.clients]
    bits_up = [b * (p.act_bits(l) + s.s_y)] * n
    up = max(f + d for f, d in zip(fluid_finish(cf, bits_up, man.net.capacity[hop_up], weights),
                                   up_delay, strict=True))
    srv = psl_epsl(p, s, l, man.phi)
    fin = fluid_finish([0.0] * n, [b * p.act_bits(l)] * n, man.net.capacity[hop_down], weights)
    down = max(f + d + s.beta * x for f, d, x in zip(fin, dn_delay, cf, strict=True))
    return {"up": up, "server_f": srv["server_f"], "server_b": srv["server_b"], "down": down,
            "total": up + srv["server_f"] + srv["server_b"] + down}


# -- making it real ---------------------------------------------------------------------------
def access_link(topo: Any, client: str) -> tuple[str, str, dict]:
    """The topology link joining `client` to the network (its only link)."""
    (link,) = [(a, b, i) for a, b, i in topo.links(withInfo=True) if client in (a, b)]
    return link


def shape_access_links(topo: Any, clients: Sequence[str],
                       rates: Mapping[str, tuple[float, float]]) -> Any:
    """Give each client's access link its own (up, down) rate limit in bit/s, declared in the
    unbuilt topology (in place), so the link backend shapes it and `apply` can change it."""
    for c in clients:
        a, _, info = access_link(topo, c)
        up, down = rates[c] if info.get("node1", a) == c else rates[c][::-1]
        info.update(bw_up=up / 1e6, bw_down=down / 1e6)
    return topo


def apply(network: Any, topo: Any, rates: Mapping[str, tuple[float, float]],
          log: Callable[[str], None] = print) -> None:
    """Set each client's access link of a running network to its (up, down) rate (bit/s)."""
    if not hasattr(network, "set_link"):
        log(f"allocation NOT applied: the {network.kind} network has no links to shape")
        return
    for c, (up, down) in rates.items():
        a, b, _ = access_link(topo, c)
        other = b if a == c else a
        network.set_link(c, other, bw_up=up / 1e6, bw_down=down / 1e6)
        log(f"allocation: {c} up {up / 1e6:.3f} Mbit/s, down {down / 1e6:.3f} Mbit/s")


def allocate_run(topo: Any, cfg: Any, mode: str,
                 log: Callable[[str], None] = print) -> tuple[Any, Callable[[Any], None]]:
    """For `sledge run --allocate`: the run's config with the cut the manager chooses, and the
    on_start hook that applies its shares. mode "static": exact shares on per-UE links;
    "on-demand": the cut that is best when the UEs share the cell work-conservingly (no
    per-UE cap, nothing to apply)."""

    from testbed.plan.runplan import host_roles, per_host

    try:
        model, terms = model_of(cfg.scheme.name, cfg.scheme.options)
    except ValueError:
        model, terms = None, {}
    if model != "psl_epsl" or len(cfg.model.cuts) != 1 or cfg.net.tiers:
        raise ValueError("--allocate: the resource manager models two-tier PSL/EPSL rounds "
                         f"(scheme {cfg.scheme.name!r}, cuts {cfg.model.cuts}, "
                         f"tiers {cfg.net.tiers})")
    roles = host_roles(topo, cfg.net.roles)
    clients = [h for h, r in roles.items() if r == "client"]
    servers = [h for h, r in roles.items() if r == "server"]
    cycles = per_host(topo, "cycles", cfg.devices.cycles, roles)
    missing = [h for h in (*clients, *servers) if h not in cycles]
    if len(servers) != 1 or missing:
        raise ValueError(f"--allocate: needs one server and modelled compute (--cycles) for "
                         f"every client and the server; missing {missing}")
    from testbed.plan.latency import network_of

    net = network_of(topo, clients, servers[0])
    man = Manager(net, Profile.of(cfg.model.name, cfg.data.dataset), cycles,
                  batch=cfg.train.batch_size,
                  eta=cfg.devices.flops_per_cycle, beta=cfg.devices.backward_flops_factor,
                  phi=float(terms.get("phi", 0.0)))
    if mode == "on-demand":
        per = {c: on_demand(man, c, *man.cell_hops())["total"] for c in man.cuts}
        cut = min(per, key=per.get)
        log(f"allocation (on-demand): cut {cut}, {per[cut]:.3f} s/iteration predicted")
        return cfg.with_changes(cuts=[cut]), lambda exp: None
    if mode != "static":
        raise ValueError(f"--allocate {mode!r}: valid: static, on-demand")
    best = man.exhaustive()
    rates = best.rates(net)
    shape_access_links(topo, clients, man.full_rates())
    log(f"allocation (static): cut {best.cut}, {best.latency['total']:.3f} s/iteration "
        f"predicted")
    return cfg.with_changes(cuts=[best.cut]), lambda exp: apply(exp.network, topo, rates, log)
