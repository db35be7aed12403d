"""The central controller (SDN-like): where smashed data flows, and which node holds which segment.

The topology graph is data: the declared links with their current LinkParams (one directed edge
per direction: capacity, delay) and the hosts' parameters (role, `router`, `mem_mb`). Pure
functions compute routes on it (widest path by capacity, or shortest by delay) and placements of
model segments on a path; `Controller` makes routes real in a built network and recomputes them
when links change. Results are JSON-able dicts, stored with the run.

Addressing and forwarding. Every host keeps the one address Mininet gave it (`host.IP()`, what
peers dial). Switches are L2 and only ever transparent; a host forwards only if the topology
tags it `router=True`: the controller turns on ip_forward there and re-addresses it /32, so no
10/8 is "on link" by accident and a router reaches nothing the controller did not route. Routes
are per destination: `ip route replace DST/32 via NEXT dev IFACE onlink`, NEXT the next host's
own address on the path (reached across the link or L2 segment behind IFACE; interfaces need
no address of their own), and `DST/32 dev IFACE` for the last hop. Each destination's routes
come from one best-path tree towards it, so routes for different pairs never disagree and never
loop. Reverse-path filtering and ICMP redirects are off in managed hosts: the controller alone
decides paths.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import networkx as nx

from testbed.emu.linkmodel import LinkParams
from testbed.emu.links import shaping_params

INF = math.inf
METRICS = ("widest", "shortest")


class RouteError(ValueError):
    """No path the controller may use joins the named pair."""


# -- the graph ---------------------------------------------------------------------------------
def topology_graph(nodes: Mapping[str, Mapping[str, Any]],
                   links: Iterable[tuple[str, str, LinkParams]],
                   down: Iterable[Iterable[str]] = ()) -> nx.DiGraph:
    """Directed graph: a node per topology node (`switch`, `router`, `role`, `mem_mb`), an edge
    per link direction (`bw` in Mbit/s, inf when unlimited; `delay` in ms). Links in `down`
    are left out."""
    gone = {frozenset(p) for p in down}
    g = nx.DiGraph()
    for name, info in nodes.items():
        if info.get("role") == "relay":
            continue
        g.add_node(name, switch=bool(info.get("isSwitch")), router=bool(info.get("router")),
                   role=info.get("role"), mem_mb=info.get("mem_mb"))
    for a, b, p in links:
        if frozenset((a, b)) in gone:
            continue
        for u, v, d in ((a, b, p.up), (b, a, p.down)):
            g.add_edge(u, v, bw=d.bw_mbit or INF, delay=d.delay_ms)
    return g


def graph_from_topo(topo: Any, down: Iterable[Iterable[str]] = ()) -> nx.DiGraph:
    """The graph of a Topo that has not been built (planning, tests)."""
    nodes = {n: {**topo.nodeInfo(n), "isSwitch": topo.isSwitch(n)} for n in topo.nodes()}
    links = [(a, b, LinkParams.from_mininet(**shaping_params(info)))
             for a, b, info in topo.links(sort=True, withInfo=True)]
    return topology_graph(nodes, links, down)


def forwards(g: nx.DiGraph, node: str) -> bool:
    return g.nodes[node]["switch"] or g.nodes[node]["router"]


# -- routes ------------------------------------------------------------------------------------
def route_tree(g: nx.DiGraph, dst: str, metric: str = "widest") -> dict[str, str]:
    """Next node towards `dst` for every node that can reach it (Dijkstra from dst backwards).

    widest: the largest bottleneck capacity, ties to lower delay then fewer hops (the bottleneck
    is always optimal; the tie-break is Dijkstra's, exact when tied paths share the bottleneck).
    shortest: the lowest sum of one-way delays, ties to fewer hops. Only switches and routers
    carry traffic through; any host may start a path."""
    if metric not in METRICS:
        raise ValueError(f"route metric {metric!r}: valid: {list(METRICS)}")

    def key(label: tuple[float, float, int]) -> tuple:
        bw, delay, hops = label
        return (-bw, delay, hops) if metric == "widest" else (delay, hops)

    best = {dst: (INF, 0.0, 0)}
    nxt: dict[str, str] = {}
    heap = [(key(best[dst]), dst)]
    done = set()
    while heap:
        _, v = heapq.heappop(heap)
        if v in done:
            continue
        done.add(v)
        if v != dst and not forwards(g, v):
            continue
        bw, delay, hops = best[v]
        for u in g.predecessors(v):
            e = g.edges[u, v]
            cand = (min(bw, e["bw"]), delay + e["delay"], hops + 1)
            if u not in done and (u not in best or key(cand) < key(best[u])):
                best[u], nxt[u] = cand, v
                heapq.heappush(heap, (key(cand), u))
    return nxt


def path_of(nxt: Mapping[str, str], src: str, dst: str) -> list[str]:
    if src != dst and src not in nxt:
        raise RouteError(f"no usable path {src} -> {dst}")
    path = [src]
    while path[-1] != dst:
        path.append(nxt[path[-1]])
    return path


def path_metrics(g: nx.DiGraph, path: Sequence[str]) -> dict[str, Any]:
    edges = [g.edges[u, v] for u, v in pairwise(path)]
    bw = min((e["bw"] for e in edges), default=INF)
    return {"path": list(path), "bw_mbit": None if bw == INF else bw,
            "delay_ms": sum(e["delay"] for e in edges)}


def compute_routes(g: nx.DiGraph, pairs: Iterable[tuple[str, str]],
                   metric: str = "widest") -> dict[str, Any]:
    """Paths for the ordered pairs and the per-host next hops that realise them:
    {"paths": {"a->b": {path, bw_mbit, delay_ms}}, "unreachable": ["a->b"],
     "next_hops": {host: {dst: [next host, next node]}}}. Next hop = the next host on the path
    (switches are transparent); next node = the neighbour the packet leaves towards."""
    trees: dict[str, dict[str, str]] = {}
    paths: dict[str, Any] = {}
    unreachable: list[str] = []
    hops: dict[str, dict[str, list[str]]] = {}
    for src, dst in pairs:
        tree = trees.setdefault(dst, route_tree(g, dst, metric))
        try:
            path = path_of(tree, src, dst)
        except RouteError:
            unreachable.append(f"{src}->{dst}")
            continue
        paths[f"{src}->{dst}"] = path_metrics(g, path)
        at = [i for i, n in enumerate(path) if not g.nodes[n]["switch"]]
        for i, j in pairwise(at):
            hops.setdefault(path[i], {})[dst] = [path[j], path[i + 1]]
    return {"metric": metric, "paths": paths, "unreachable": unreachable, "next_hops": hops}


# -- placement ---------------------------------------------------------------------------------
PLACEMENT_RULE = ("contiguous blocks in path order, the first node holds >= 1 segment (the data "
                  "never leaves it), no node above its memory limit; minimise the most bytes "
                  "any node holds; ties: earlier nodes hold more")


def place_segments(costs: Sequence[float] | Mapping[str, Sequence[float]], path: Sequence[str],
                   limits: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """Which node on `path` holds which segment (segment i's cost: e.g. its memory in bytes;
    one list for every node, or node -> its own list, e.g. when a node's batch is larger).
    A DP over (node, segments placed so far); see PLACEMENT_RULE. Raises when nothing fits."""
    per = costs if isinstance(costs, Mapping) else dict.fromkeys(path, costs)
    costs = list(per[path[0]])
    n, k, limits = len(costs), len(path), limits or {}
    if not n or not k:
        raise ValueError("placement needs at least one segment and one node")
    prefixes = []
    for v in path:
        prefixes.append([0.0])
        for c in per[v]:
            prefixes[-1].append(prefixes[-1][-1] + c)

    def held(j: int, t: int, i: int) -> float:  # node j holding segments [t, i)
        return prefixes[j][i] - prefixes[j][t]

    def fits(j: int, t: int, i: int) -> bool:
        lim = limits.get(path[j])
        return lim is None or held(j, t, i) <= lim

    # best[j][i]: least max-load putting segments [0, i) on nodes 0..j; cut[j][i]: node j's start.
    best = [[INF] * (n + 1) for _ in range(k)]
    cut = [[0] * (n + 1) for _ in range(k)]
    for i in range(1, n + 1):
        if fits(0, 0, i):
            best[0][i] = held(0, 0, i)
    for j in range(1, k):
        for i in range(n + 1):
            for t in range(i, -1, -1):  # t descending: earlier nodes keep more on ties
                load = max(best[j - 1][t], held(j, t, i))
                if fits(j, t, i) and load < best[j][i]:
                    best[j][i], cut[j][i] = load, t
    if best[k - 1][n] == INF:
        raise ValueError(f"placement: {n} segments ({list(costs)}) do not fit on {list(path)} "
                         f"with memory limits {dict(limits)}")
    by_segment: list[str] = [""] * n
    i = n
    for j in range(k - 1, -1, -1):
        t = cut[j][i] if j else 0
        for s in range(t, i):
            by_segment[s] = path[j]
        i = t
    segments = {v: [s for s in range(n) if by_segment[s] == v] for v in path}
    return {"rule": PLACEMENT_RULE, "path": list(path), "by_segment": by_segment,
            "segments": {v: s for v, s in segments.items() if s},
            "bytes": {v: sum(per[v][s] for s in segments[v]) for v in path},
            "limits": {v: limits.get(v) for v in path}}


# -- the controller of a built network -----------------------------------------------------------
def _peer(intf: Any) -> Any:
    link = intf.link
    return link.intf2 if link.intf1 is intf else link.intf1


def _is_relay(node: Any) -> bool:
    return node.params.get("role") == "relay"


def neighbour_intfs(net: Any) -> dict[tuple[str, str], str]:
    """(node, neighbour) -> node's interface towards it, seeing through relay nodes
    (testbed.emu.links.RelayBackend puts one in the middle of every shaped link)."""
    out: dict[tuple[str, str], str] = {}
    for node in net.hosts + net.switches:
        if _is_relay(node):
            continue
        for intf in node.intfList():
            if intf.link is None:
                continue
            peer = _peer(intf)
            while _is_relay(peer.node):
                other = next(i for i in peer.node.intfList() if i.link and i is not peer)
                peer = _peer(other)
            out.setdefault((node.name, peer.node.name), intf.name)
    return out


class Controller:
    """Routes and placement for a built testbed.emu.network.Network; call `install` before nodes
    start, and `set_link` / `link_down` / `link_up` (or `recompute`) when the network changes."""

    def __init__(self, network: Any, metric: str = "widest",
                 echo: Callable[[str], None] | None = print) -> None:
        if metric not in METRICS:
            raise ValueError(f"route metric {metric!r}: valid: {list(METRICS)}")
        self.network, self.metric, self.echo = network, metric, echo or (lambda _: None)
        net = network.net
        self.hosts = {h.name: h for h in net.hosts if not _is_relay(h)}
        self.nodes = {**{n: h.params for n, h in self.hosts.items()},
                      **{s.name: {**s.params, "isSwitch": True} for s in net.switches}}
        self.intfs = neighbour_intfs(net)
        self.down: set[frozenset[str]] = set()
        self.pairs: list[tuple[str, str]] = []
        self.state: dict[str, Any] = {}
        self.installed: dict[str, dict[str, dict[str, Any]]] = {}  # host -> dst -> entry
        self._prepared: set[str] = set()

    def graph(self) -> nx.DiGraph:
        """The graph as the network is now: current link parameters, down links left out."""
        current = self.network.links.params
        links = [(a, b, current.get((a, b), p)) for a, b, p in self.network.links.declared]
        return topology_graph(self.nodes, links, self.down)

    def all_pairs(self) -> list[tuple[str, str]]:
        return [(a, b) for a in self.hosts for b in self.hosts if a != b]

    # -- routes ------------------------------------------------------------------------------
    def install(self, pairs: Iterable[tuple[str, str]] | None = None,
                metric: str | None = None) -> dict[str, Any]:
        """Compute and install routes both ways between the pairs (default: all hosts).
        Raises RouteError if a pair has no path."""
        self.metric = metric or self.metric
        wanted = self.all_pairs() if pairs is None else [
            q for a, b in pairs for q in ((a, b), (b, a))]
        self.pairs = list(dict.fromkeys(wanted))
        for name in self.hosts:
            self._prepare(name)
        state = self.recompute()
        if state["unreachable"]:
            raise RouteError(f"no usable path for {state['unreachable']}")
        return state

    def recompute(self) -> dict[str, Any]:
        """Recompute the routes of the installed pairs on the current graph and install them
        (every entry replaced, stale ones deleted); pairs left without a path lose their routes
        and are listed unreachable."""
        state = compute_routes(self.graph(), self.pairs, self.metric)
        tables = {h: {dst: self._entry(h, dst, nh, via) for dst, (nh, via) in t.items()}
                  for h, t in state["next_hops"].items()}
        for host in sorted(set(tables) | set(self.installed)):
            self._apply(host, self.installed.get(host, {}), tables.get(host, {}))
        self.installed = tables
        self.state = {**{k: v for k, v in state.items() if k != "next_hops"},
                      "down": sorted(sorted(p) for p in self.down), "tables": tables}
        self._print_routes()
        return self.state

    def _entry(self, host: str, dst: str, next_host: str, via_node: str) -> dict[str, Any]:
        dev, ip = self.intfs[(host, via_node)], self.hosts[dst].IP()
        if next_host == dst:
            return {"dst": ip, "next": dst, "via": None, "dev": dev, "route": f"{ip}/32 dev {dev}"}
        via = self.hosts[next_host].IP()
        return {"dst": ip, "next": next_host, "via": via, "dev": dev,
                "route": f"{ip}/32 via {via} dev {dev} onlink"}

    def _prepare(self, name: str) -> None:
        """Once per host: the controller alone decides paths (see the module docstring)."""
        if name in self._prepared:
            return
        host = self.hosts[name]
        cmds = ["sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 "
                "net.ipv4.conf.all.accept_redirects=0 net.ipv4.conf.all.send_redirects=0",
                "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done"]
        if host.params.get("router"):
            intf = host.defaultIntf()
            cmds += ["sysctl -qw net.ipv4.ip_forward=1",
                     f"ip addr del {intf.IP()}/{intf.prefixLen} dev {intf.name}",
                     f"ip addr add {intf.IP()}/32 dev {intf.name}"]
        self._run(host, cmds)
        self._prepared.add(name)

    def _apply(self, name: str, old: dict[str, dict], new: dict[str, dict]) -> None:
        self._prepare(name)
        stale = [f"ip route del {e['dst']}/32 2>/dev/null || true"
                 for d, e in old.items() if d not in new]
        self._run(self.hosts[name], stale + [f"ip route replace {e['route']}"
                                             for e in new.values()])

    # A node's shell reads commands from a terminal, whose line is cut at 4095 bytes: with
    # hundreds of destinations (200 shaped clients) one joined line would be cut mid-route.
    LINE_MAX = 3000

    @staticmethod
    def _run(host: Any, cmds: list[str]) -> None:
        chunk: list[str] = []
        for i, c in enumerate(cmds):
            chunk.append(c)
            if i + 1 == len(cmds) or sum(map(len, chunk)) + len(cmds[i + 1]) + 2 * len(chunk) \
                    > Controller.LINE_MAX:
                out = host.cmd("; ".join(chunk))
                if out.strip():
                    raise RuntimeError(f"controller: in {host.name}: {' ; '.join(chunk)[:2000]}: "
                                       f"{out.strip()[:2000]}")
                chunk = []

    def _print_routes(self, most: int = 24) -> None:
        paths, lost = self.state["paths"], self.state["unreachable"]
        self.echo(f"routes ({self.metric}): {len(paths)} paths, {len(lost)} unreachable"
                  + (f", down: {self.state['down']}" if self.down else ""))
        for pair, p in list(paths.items())[:most]:
            bw = "unlimited" if p["bw_mbit"] is None else f"{p['bw_mbit']:g} Mbit/s"
            self.echo(f"  {pair:<14} {' '.join(p['path'])}  ({bw}, {p['delay_ms']:g} ms)")
        if len(paths) > most:
            self.echo(f"  ... {len(paths) - most} more in the returned dict")
        for pair in lost:
            self.echo(f"  {pair:<14} UNREACHABLE")

    # -- changes to the network ------------------------------------------------------------------
    def set_link(self, a: str, b: str, **params: Any) -> dict[str, Any]:
        """Change the a-b link (Mininet keys, as Network.set_link) and reroute."""
        self.network.set_link(a, b, **params)
        return self.recompute()

    def link_down(self, a: str, b: str, apply: bool = True) -> dict[str, Any]:
        """Take the a-b link down (or, with apply=False, note a failure made elsewhere), reroute."""
        if apply:
            self.network.link_down(a, b)
        self.down.add(frozenset((a, b)))
        return self.recompute()

    def link_up(self, a: str, b: str, apply: bool = True) -> dict[str, Any]:
        if apply:
            self.network.link_up(a, b)
        self.down.discard(frozenset((a, b)))
        return self.recompute()

    # -- placement ---------------------------------------------------------------------------
    def placement(self, costs: Sequence[float], path: Sequence[str],
                  limits: Mapping[str, float | None] | None = None) -> dict[str, Any]:
        """place_segments with each node's limit from `limits`, else its `mem_mb` tag."""
        tagged = {v: self.nodes[v]["mem_mb"] * 2**20 for v in path
                  if self.nodes.get(v, {}).get("mem_mb") is not None}
        result = place_segments(costs, path, {**tagged, **(limits or {})})
        self.echo("placement: " + ", ".join(f"{v}: {s}" for v, s in result["segments"].items()))
        return result
