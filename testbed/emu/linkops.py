"""Changing links while a run goes: the link model applied to a network's backend, then re-routed.

`LinkOps` applies a change (set_link, link_down, link_up) through a network's link backend
(testbed.emu.links) and, when there is one, lets the routing controller (testbed.emu.routing)
recompute paths, timing both; `RecordingBackend` is the link model without a network (dry runs,
loopback runs). It does not decide *when* a link changes (testbed.scenario does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from testbed.emu.linkmodel import LinkParams
from testbed.emu.links import LinkBackend, shaping_params


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
        from testbed.emu.network import read_net_dev

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


def link_ops(network: Any, topo: Any, controller: Any = None) -> LinkOps:
    """The LinkOps of a built network: its link backend and controller. The loopback network
    shapes nothing: the link model is tracked (and logged as not applied)."""
    if getattr(network, "kind", None) == "mininet":
        return LinkOps(network.links, controller)
    backend = RecordingBackend()
    backend.prepare(topo)
    return LinkOps(backend, applied=False)
