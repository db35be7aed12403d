"""What topology scripts share: the Topo base class, parameters given inline or as YAML, and link
classes as presets.

Topology scripts stay small and declarative; the little machinery they have in common lives here
so that a parameter means the same thing in every script. `Topo` is Mininet's when Debian's
mininet package is importable; without it (a loopback run, `sledge --help` on a laptop) it is a
small stand-in with the same graph API (nodes, links, info dicts, natural sort order), so a
topology describes the same hosts and links either way. Building a real network still needs
Mininet (testbed.emu.network); nothing here emulates anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from testbed.emu.linkmodel import preset


def _natural(text: Any) -> list:
    # Mininet's order: "c2" before "c10".
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", str(text))]


class FallbackTopo:
    """Mininet's Topo graph API (mininet/topo.py), for machines without Mininet: hosts, switches
    and links with their info dicts, in Mininet's order, with Mininet's port numbering."""

    def __init__(self, *args: Any, **params: Any) -> None:
        self._nodes: dict[str, dict] = {}
        # src -> dst -> key -> info; both directions share the same key dict, as in Mininet.
        self._edges: dict[str, dict[str, dict[Any, dict]]] = {}
        self.hopts = params.pop("hopts", {})
        self.sopts = params.pop("sopts", {})
        self.lopts = params.pop("lopts", {})
        self.ports: dict[str, dict[int, tuple[str, int]]] = {}
        self.build(*args, **params)

    def build(self, *args: Any, **params: Any) -> None:
        pass

    def addNode(self, name: str, **opts: Any) -> str:  # noqa: N802 - Mininet's API
        self._nodes[name] = dict(opts)
        return name

    def addHost(self, name: str, **opts: Any) -> str:  # noqa: N802
        return self.addNode(name, **(opts or self.hopts))

    def addSwitch(self, name: str, **opts: Any) -> str:  # noqa: N802
        return self.addNode(name, isSwitch=True, **(opts or self.sopts))

    def addLink(self, node1: str, node2: str, port1: int | None = None,  # noqa: N802
                port2: int | None = None, key: Any = None, **opts: Any) -> Any:
        opts = dict(opts or self.lopts)
        port1, port2 = self.addPort(node1, node2, port1, port2)
        opts.update(node1=node1, node2=node2, port1=port1, port2=port2)
        for n in (node1, node2):
            self._nodes.setdefault(n, {})
            self._edges.setdefault(n, {})
        entry = self._edges[node1].setdefault(node2, {})
        self._edges[node2][node1] = entry
        if key is None:
            key = max([0, *(k for k in entry if isinstance(k, int))]) + 1
        entry[key] = opts
        return key

    def addPort(self, src: str, dst: str, sport: int | None = None,  # noqa: N802
                dport: int | None = None) -> tuple[int, int]:
        self.ports.setdefault(src, {})
        self.ports.setdefault(dst, {})
        if sport is None:
            sport = len(self.ports[src]) + (1 if self.isSwitch(src) else 0)
        if dport is None:
            dport = len(self.ports[dst]) + (1 if self.isSwitch(dst) else 0)
        self.ports[src][sport] = (dst, dport)
        self.ports[dst][dport] = (src, sport)
        return sport, dport

    @staticmethod
    def sorted(items: Iterable[str]) -> list[str]:
        return sorted(items, key=_natural)

    def nodes(self, sort: bool = True) -> list[str]:
        return self.sorted(self._nodes) if sort else list(self._nodes)

    def isSwitch(self, n: str) -> bool:  # noqa: N802
        return bool(self._nodes[n].get("isSwitch", False))

    def switches(self, sort: bool = True) -> list[str]:
        return [n for n in self.nodes(sort) if self.isSwitch(n)]

    def hosts(self, sort: bool = True) -> list[str]:
        return [n for n in self.nodes(sort) if not self.isSwitch(n)]

    def iterLinks(self, withKeys: bool = False, withInfo: bool = False):  # noqa: N802, N803
        for src, entry in self._edges.items():
            for dst, keyed in entry.items():
                if src > dst:  # each link once, as Mininet's MultiGraph does
                    continue
                for k, info in keyed.items():
                    out = (info["node1"], info["node2"], *((k,) if withKeys else ()),
                           *((info,) if withInfo else ()))
                    yield out

    def links(self, sort: bool = False, withKeys: bool = False,  # noqa: N803
              withInfo: bool = False) -> list[tuple]:
        links = list(self.iterLinks(withKeys, withInfo))
        if not sort:
            return links
        size = 3 if withKeys else 2
        return sorted(links, key=lambda li: [_natural(x) for x in li[:size]])

    def port(self, src: str, dst: str) -> Any:
        ports = [(s, e[1]) for s, e in self.ports[src].items() if e[0] == dst]
        return ports if len(ports) != 1 else ports[0]

    def linkInfo(self, src: str, dst: str, key: Any = None) -> dict:  # noqa: N802
        entry = self._edges[src][dst]
        return entry[min(entry) if key is None else key]

    def setlinkInfo(self, src: str, dst: str, info: dict, key: Any = None) -> None:  # noqa: N802
        entry = self._edges[src][dst]
        entry[min(entry) if key is None else key] = info

    def nodeInfo(self, name: str) -> dict:  # noqa: N802
        return self._nodes[name]

    def setNodeInfo(self, name: str, info: dict) -> None:  # noqa: N802
        self._nodes[name] = info


try:  # Mininet's own class wherever it is installed, so a built network sees no difference
    from mininet.topo import Topo
except ImportError:
    Topo = FallbackTopo  # type: ignore[misc,assignment]


def load(spec: dict | str | None) -> dict:
    """A parameter mapping given inline or as a YAML file path."""
    if isinstance(spec, str):
        return yaml.safe_load(Path(spec).read_text()) or {}
    return dict(spec or {})


def link_kwargs(spec: dict | str | None, defaults: dict[str, str]) -> dict[str, dict]:
    """Mininet link kwargs per link class: its default preset with the overrides `spec` gives."""
    given = load(spec)
    if unknown := sorted(set(given) - set(defaults)):
        raise ValueError(f"links: unknown link class(es) {unknown}; valid: {sorted(defaults)}")
    out = {}
    for cls, name in defaults.items():
        over = given.get(cls) or {}
        over = {"preset": over} if isinstance(over, str) else dict(over)
        out[cls] = preset(over.pop("preset", name), **over).to_mininet()
    return out
