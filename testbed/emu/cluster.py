"""The emulated network over several machines: Mininet's cluster edition, shaped like one.

`build_cluster` builds the topology with `mininet.examples.cluster.MininetCluster`: its
RemoteHost, its GRE links between servers (RemoteGRELink, here with the shaped interfaces of
testbed.emu.network so the netem backend works on every link, cross-server ones included), its
placers, and Open vSwitch bridges in standalone mode (no controller, as on one machine). A
node's server is `cluster.place[node]` if given, else the placer's choice. `ClusterNetwork`
reads each server's interface counters on that server (one SSH call per server per reading,
never through a node's shell, which a scenario's thread may be using).

It does not start nodes, forwarders or anything else on the servers (testbed.run.cluster), does
not set up SSH (password-less root SSH from this machine to every server, `UseDNS no`, sudo,
Open vSwitch and the same sledge install at the same path are the user's: docs/cluster.md),
and never runs Mininet's own cluster cleanup (`mn -c` on every server).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any

from mininet.examples.cluster import (
    HostSwitchBinPlacer,
    MininetCluster,
    RandomPlacer,
    RemoteGRELink,
    RemoteHost,
    RemoteOVSSwitch,
    RoundRobinPlacer,
    SwitchBinPlacer,
)
from mininet.log import setLogLevel
from mininet.topo import Topo

from testbed.emu.capabilities import Capabilities
from testbed.emu.links import choose_backend
from testbed.emu.loopback import parse_net_dev, read_net_dev
from testbed.emu.network import Network, ShapedIntf, start_net

PLACERS = {"switchbin": SwitchBinPlacer, "hostswitchbin": HostSwitchBinPlacer,
           "roundrobin": RoundRobinPlacer, "random": RandomPlacer}


class RemoteOVSBridge(RemoteOVSSwitch):
    """Mininet's OVSBridge on any server: a standalone (learning) bridge, no controller."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.update(failMode="standalone")
        super().__init__(*args, **kwargs)

    def start(self, controllers: list) -> None:
        super().start(controllers=[])

    def connected(self) -> bool:
        return True


class ClusterLink(RemoteGRELink):
    """A GRE tunnel between servers (a veth pair within one), with shaped interfaces."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("cls1", ShapedIntf)
        kwargs.setdefault("cls2", ShapedIntf)
        super().__init__(*args, **kwargs)


def is_remote(node: Any) -> bool:
    """On another server than this one (Mininet's own attribute)."""
    return bool(getattr(node, "isRemote", False))


@dataclass
class ClusterNetwork(Network):
    """A Network whose nodes may be on other servers (`host.server`)."""

    kind = "mininet-cluster"

    def servers(self) -> dict[str, str]:
        """node -> server, every host and switch."""
        return {n.name: n.server for n in self.net.hosts + self.net.switches}

    def remote_hosts(self) -> list[str]:
        return sorted(h.name for h in self.net.hosts if is_remote(h))

    def describe_hosts(self) -> dict[str, dict]:
        out = super().describe_hosts()
        for name, d in out.items():
            d["server"] = self.net.get(name).server
        return out

    def counters(self) -> dict[str, dict[str, int]]:
        """Kernel counters of every link interface, read on the server and in the namespace
        that holds it: this machine's from /proc, another server's by one SSH call."""
        result: dict[str, dict[str, int]] = {}
        by_server: dict[str, list[Any]] = {}
        for node in self.net.hosts + self.net.switches:
            if is_remote(node):
                by_server.setdefault(node.server, []).append(node)
                continue
            names = {i.name for i in node.intfList() if i.name != "lo"}
            path = f"/proc/{node.pid}/net/dev" if node.inNamespace else "/proc/net/dev"
            result.update({k: v for k, v in read_net_dev(path).items() if k in names})
        for nodes in by_server.values():
            script = "".join(f"echo @@{n.pid}; cat /proc/{n.pid}/net/dev; " for n in nodes)
            text = nodes[0].rcmd(["sh", "-c", shlex.quote(script)], tt=False)
            parts = dict(p.split("\n", 1) for p in text.split("@@")[1:] if "\n" in p)
            for n in nodes:
                names = {i.name for i in n.intfList() if i.name != "lo"}
                dev = parse_net_dev(parts.get(str(n.pid), "").replace("\r", ""))
                result.update({k: v for k, v in dev.items() if k in names})
        return result


def build_cluster(topo: Topo, caps: Capabilities, *, servers: list[str], placer: str,
                  place: dict[str, str], link_backend: str = "auto",
                  verbosity: str = "warning") -> ClusterNetwork:
    """Build and start the net over `servers` ("localhost" is this machine). On any failure
    what was built is stopped before raising. No cpu/mem limits (cgroups are per machine)."""
    setLogLevel(verbosity)
    unknown = sorted(set(place) - set(topo.nodes()))
    if unknown:
        raise ValueError(f"cluster.place: no node {unknown} in the topology")
    links = choose_backend(caps.netem, link_backend)
    if links.name != "netem":
        raise ValueError("a cluster needs the netem link backend on every server (the relay "
                         "backend's processes run on this machine only)")
    topo = links.prepare(topo)
    for node, server in place.items():
        topo.nodeInfo(node)["server"] = server
    net = MininetCluster(topo=topo, servers=servers, placement=PLACERS[placer],
                         host=RemoteHost, switch=RemoteOVSBridge, link=ClusterLink,
                         controller=None, autoSetMacs=True, build=False, waitConnected=False)
    start_net(net, links)
    return ClusterNetwork(net=net, caps=caps, links=links)
