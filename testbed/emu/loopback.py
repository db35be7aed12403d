"""The network side of a run that needs no Mininet: the loopback network and kernel counters.

`LoopbackNetwork` puts every node on 127.0.0.1 in the root namespace (scheme development, no
root, no emulation); `read_net_dev` / `counter_delta` read and difference the interface
counters a Mininet network reports. The emulated network itself is testbed.emu.network, the only
module that imports Mininet's network classes; this one must stay importable without Mininet.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import Any

from testbed.emu.capabilities import Capabilities
from testbed.emu.topolib import Topo

COUNTERS = ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets", "rx_dropped", "tx_dropped")


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

    def oom_kills(self, host: str) -> int:
        return 0

    def stop(self) -> None:
        pass


def read_net_dev(path: str = "/proc/net/dev") -> dict[str, dict[str, int]]:
    with open(path) as f:
        return parse_net_dev(f.read())


def parse_net_dev(text: str) -> dict[str, dict[str, int]]:
    """The counters in the text of a /proc/net/dev (two header lines, then one per device)."""
    out = {}
    for line in text.splitlines()[2:]:
        name, _, rest = line.partition(":")
        if not rest.strip():
            continue
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
