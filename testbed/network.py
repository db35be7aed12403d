"""The emulated network: build a Mininet net from a topology, read its counters, stop it.

Topologies (topologies/*.py) say *what* the network is: hosts with a `role`, switches and
links with bandwidth, delay, jitter, loss and queue parameters. This module makes it real
with what the kernel offers (testbed.capabilities): Open vSwitch where the kernel has it,
Linux bridges with no controller where it does not; the link backend (testbed.links: netem,
or a user-space relay node per shaped link) applies and changes the link parameters.
"""

from __future__ import annotations

import math
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from mininet.link import TCIntf, TCLink
from mininet.log import setLogLevel
from mininet.net import Mininet
from mininet.node import OVSBridge
from mininet.nodelib import LinuxBridge
from mininet.topo import Topo

from testbed.capabilities import Capabilities
from testbed.linkmodel import LinkParams
from testbed.links import LinkBackend, choose_backend

COUNTERS = ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets", "rx_dropped", "tx_dropped")


class ShapedIntf(TCIntf):
    """TCIntf whose HTB root sets r2q from the rate, so the class quantum stays within the
    kernel's bounds (Mininet's default r2q makes tc warn 'quantum is big' above ~16 Mbit/s)."""

    def bwCmds(self, bw: float | None = None, **kw: Any) -> tuple[list[str], str]:  # noqa: N802
        cmds, parent = super().bwCmds(bw=bw, **kw)
        if bw:
            r2q = max(10, math.ceil(bw * 1e6 / 8 / 60000))
            cmds = [c.replace("htb default 1", f"htb default 1 r2q {r2q}") for c in cmds]
        return cmds, parent


class ShapedLink(TCLink):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("cls1", ShapedIntf)
        kwargs.setdefault("cls2", ShapedIntf)
        super().__init__(*args, **kwargs)


@dataclass
class Network:
    """A started Mininet net and the backend that shapes its links."""

    net: Mininet
    caps: Capabilities
    links: LinkBackend
    not_applied: list[dict] = field(default_factory=list)
    kind = "mininet"

    # -- run-time link changes (see testbed.links) ---------------------------------------------
    def set_link(self, a: str, b: str, **params: Any) -> LinkParams:
        return self.links.set_link(a, b, **params)

    def link_down(self, a: str, b: str) -> None:
        self.links.link_down(a, b)

    def link_up(self, a: str, b: str) -> None:
        self.links.link_up(a, b)

    def hosts_by_role(self, role: str) -> list[str]:
        return [h.name for h in self.net.hosts if h.params.get("role") == role]

    def ip(self, host: str) -> str:
        return self.net.get(host).IP()

    def host(self, name: str) -> Any:
        """The node to start a process in (has `popen`)."""
        return self.net.get(name)

    def describe_hosts(self) -> dict[str, dict]:
        return {h.name: {"role": h.params.get("role"), "ip": h.IP()} for h in self.net.hosts
                if h.params.get("role") != "relay"}

    def link_params(self) -> list[dict]:
        """The link model of every shaped link as applied (for the run's config)."""
        return [{"link": f"{a}-{b}", "backend": self.links.name, **p.to_dict(),
                 **({"relay": self.links.relays[(a, b)]} if self.links.name == "relay" else {})}
                for (a, b), p in self.links.params.items()]

    def counters(self) -> dict[str, dict[str, int]]:
        """Kernel counters of every link interface, read inside the namespace that holds it."""
        result: dict[str, dict[str, int]] = {}
        for node in self.net.hosts + self.net.switches:
            names = {i.name for i in node.intfList() if i.name != "lo"}
            # /proc/<pid>/net/dev shows the devices of that process's network namespace.
            path = f"/proc/{node.pid}/net/dev" if node.inNamespace else "/proc/net/dev"
            for name, values in read_net_dev(path).items():
                if name in names:
                    result[name] = values
        return result

    def stop(self) -> None:
        try:
            self.links.stop()
        finally:
            self.net.stop()


class LocalHost:
    """A host of the loopback network: processes run in the root namespace, own session."""

    def __init__(self, name: str, params: dict) -> None:
        self.name, self.params = name, params

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(cmd, start_new_session=True, **kw)


@dataclass
class LoopbackNetwork:
    """No emulation at all: every node on 127.0.0.1, for developing schemes without root.

    Results from it say `network: loopback`; no link parameter is applied and there are no
    interface counters. It exists so scheme logic can be checked fast; measurements come from
    the Mininet network only.
    """

    topo: Topo
    caps: Capabilities
    kind = "loopback"

    def __post_init__(self) -> None:
        self.hosts = {h: LocalHost(h, self.topo.nodeInfo(h)) for h in self.topo.hosts()}
        self.not_applied = [{"link": "all", "every parameter": "loopback network"}]

    def hosts_by_role(self, role: str) -> list[str]:
        return [n for n, h in self.hosts.items() if h.params.get("role") == role]

    def ip(self, host: str) -> str:
        return "127.0.0.1"

    def host(self, name: str) -> LocalHost:
        return self.hosts[name]

    def describe_hosts(self) -> dict[str, dict]:
        return {n: {"role": h.params.get("role"), "ip": "127.0.0.1"} for n, h in self.hosts.items()}

    def link_params(self) -> list[dict]:
        return []

    def counters(self) -> dict[str, dict[str, int]]:
        return {}

    def stop(self) -> None:
        pass


def read_net_dev(path: str = "/proc/net/dev") -> dict[str, dict[str, int]]:
    with open(path) as f:
        lines = f.readlines()[2:]
    out = {}
    for line in lines:
        name, _, rest = line.partition(":")
        v = [int(x) for x in rest.split()]
        # Columns: rx bytes packets errs drop fifo frame compressed multicast, then tx ...
        out[name.strip()] = {
            "rx_bytes": v[0], "rx_packets": v[1], "rx_dropped": v[3],
            "tx_bytes": v[8], "tx_packets": v[9], "tx_dropped": v[11],
        }
    return out


def counter_delta(after: dict, before: dict) -> dict[str, dict[str, int]]:
    return {
        intf: {k: after[intf][k] - before.get(intf, {}).get(k, 0) for k in COUNTERS}
        for intf in after
    }


def build_network(topo: Topo, caps: Capabilities, *, link_backend: str = "auto",
                  verbosity: str = "warning") -> Network:
    """Build and start the net. On any failure what was built is stopped before raising."""
    if os.geteuid() != 0:
        raise PermissionError("building a Mininet network needs root: run with sudo")
    setLogLevel(verbosity)
    links = choose_backend(caps.netem, link_backend)
    topo = links.prepare(topo)
    switch = OVSBridge if caps.ovs else LinuxBridge
    net = Mininet(topo=topo, switch=switch, controller=None, link=ShapedLink,
                  autoSetMacs=True, build=False, waitConnected=False)
    try:
        net.build()
        net.start()
        links.start(net)
    except BaseException:
        try:
            links.stop()
        finally:
            net.stop()
        raise
    return Network(net=net, caps=caps, links=links)
