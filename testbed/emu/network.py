"""The emulated network: build a Mininet net from a topology, read its counters, stop it.

Topologies (topologies/*.py) say *what* the network is: hosts with a `role`, switches and
links with bandwidth, delay, jitter, loss and queue parameters. This module makes it real
with what the kernel offers (testbed.emu.capabilities): Open vSwitch where the kernel has it,
Linux bridges with no controller where it does not; the link backend (testbed.emu.links: netem,
or a user-space relay node per shaped link) applies and changes the link parameters.
Hosts that declare resources (`cpu`, Mininet's fraction of the whole machine, and `mem_mb`)
become LimitedHosts: Mininet's CPULimitedHost (cgroup v1 CFS quota) plus a memory cgroup.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from mininet.link import TCIntf, TCLink
from mininet.log import error, setLogLevel
from mininet.net import Mininet
from mininet.node import CPULimitedHost, Host, OVSBridge
from mininet.nodelib import LinuxBridge
from mininet.topo import Topo

from testbed.emu.capabilities import Capabilities
from testbed.emu.linkmodel import LinkParams
from testbed.emu.links import LinkBackend, choose_backend

# Moved to testbed.emu.loopback (no Mininet there); re-exported for the callers that import
# them here.
from testbed.emu.loopback import (  # noqa: F401
    COUNTERS,
    LocalHost,
    LoopbackNetwork,
    counter_delta,
    read_net_dev,
)

CGROUP_ROOT = "/sys/fs/cgroup"
RESOURCES = ("cpu", "mem_mb")  # host parameters that make a host a LimitedHost


class ShapedIntf(TCIntf):
    """TCIntf whose HTB root sets r2q from the rate, so the class quantum stays within the
    kernel's bounds (Mininet's default r2q makes tc warn 'quantum is big' above ~16 Mbit/s),
    and accepts rates above Mininet's 1000 Mbit/s cap, which 6G backhaul needs."""

    bwParamMax = 400_000  # noqa: N815 - Mininet's attribute name

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


def _write(path: str, value: object) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


class IPv4Host(Host):
    """A Mininet host with IPv6 off. sledge addresses hosts over IPv4 only, and with IPv6 on
    every interface that comes up sends link-local multicast (duplicate-address checks, router
    solicitations, MLD reports) that a switch floods to all its ports, through every relay on
    the way: N^2 frames for N hosts on one switch, which dominated a 1000-client start-up
    (docs/scale.md). A topology that wants IPv6 declares its own host class."""

    ipv6 = False  # True: leave the kernel's default (benchmarks/scale.py's side-by-side row)

    def config(self, **params: Any) -> dict:
        if not self.ipv6:
            self.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
                     "net.ipv6.conf.default.disable_ipv6=1")
        return super().config(**params)


class LimitedHost(IPv4Host, CPULimitedHost):
    """CPULimitedHost (cpu: fraction of the whole machine, CFS quota) plus mem_mb: a cgroup v1
    memory limit, which Mininet lacks. The memory cgroup holds the host's shell (so `cmd`
    children are limited, as CPULimitedHost does for cpu); `popen` does not join it (mnexec -g
    joins cpu, cpuacct and cpuset only), so launchers join `cgroup_dirs()` explicitly."""

    memcg: str | None = None

    def config(self, mem_mb: int | None = None, **params: Any) -> dict:
        r = super().config(**params)
        if mem_mb:
            self.set_memory_limit(int(mem_mb))
        return r

    def set_memory_limit(self, mb: int) -> None:
        # Inside the controller's own memory cgroup, so the node stays within any limit the
        # controller runs under; named per controller process, so never someone else's group.
        root = own_cgroup("memory")
        if not os.path.isfile(os.path.join(root, "memory.limit_in_bytes")):
            raise RuntimeError(f"host {self.name}: mem_mb needs the cgroup v1 memory "
                               f"controller (no {root}/memory.limit_in_bytes)")
        path = os.path.join(root, f"sledge-{os.getpid()}-{self.name}")
        os.mkdir(path)
        self.memcg = path
        _write(os.path.join(path, "memory.limit_in_bytes"), mb << 20)
        _write(os.path.join(path, "cgroup.procs"), self.pid)

    def cgroup_dirs(self) -> list[str]:
        """Every cgroup directory a process must join to be limited like this host."""
        dirs = [os.path.join(CGROUP_ROOT, c, self.name) for c in ("cpu", "cpuacct", "cpuset")]
        return usable_cgroups(dirs) + ([self.memcg] if self.memcg else [])

    def limits(self) -> dict[str, Any]:
        """The limits as the kernel holds them (not as declared)."""
        cpu = os.path.join(CGROUP_ROOT, "cpu", self.name)
        out: dict[str, Any] = {}
        with contextlib.suppress(OSError):
            out["cfs_quota_us"] = int(_read(os.path.join(cpu, "cpu.cfs_quota_us")))
            out["cfs_period_us"] = int(_read(os.path.join(cpu, "cpu.cfs_period_us")))
        if self.memcg:
            out["mem_limit_bytes"] = int(_read(os.path.join(self.memcg,
                                                            "memory.limit_in_bytes")))
        return out

    def oom_kills(self) -> int:
        """Processes the kernel OOM killer has killed in this host's memory cgroup."""
        if not self.memcg:
            return 0
        try:
            text = _read(os.path.join(self.memcg, "memory.oom_control"))
        except OSError:
            return 0
        fields = dict(line.split() for line in text.splitlines() if line.strip())
        return int(fields.get("oom_kill", 0))

    def cleanup(self) -> None:
        # Mininet's `cgdelete -r cpu,cpuacct,cpuset:/name` assumes those controllers share
        # one hierarchy; where they are mounted separately it removes only the first and leaves
        # cpuacct/<name> and cpuset/<name> behind. So remove every directory we own ourselves,
        # in every hierarchy that has one, after Mininet has tried.
        super().cleanup()
        owned = [os.path.join(CGROUP_ROOT, c, self.name) for c in CPU_HIERARCHIES]
        for path in [*owned, *([self.memcg] if self.memcg else [])]:
            remove_cgroup(path, self.name)
        self.memcg = None


# Where Mininet's CPULimitedHost creates `<name>` (cgcreate -g cpu,cpuacct,cpuset:/name): one
# directory per hierarchy, whether the controllers are co-mounted (cpu,cpuacct) or separate.
CPU_HIERARCHIES = ("cpu", "cpuacct", "cpu,cpuacct", "cpuset")


def remove_cgroup(path: str, owner: str, timeout_s: float = 5.0) -> bool:
    """Remove the cgroup directory `path` of host `owner` (children first). A process still in
    it is one of the host's (its shell was just sent SIGHUP, or a node that outlived it): it gets
    SIGKILL, since an occupied cgroup cannot be removed. Never raises: net.stop() must go on."""
    if not os.path.isdir(path) or os.path.islink(path):
        return True
    for child in sorted((e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)),
                        reverse=True):
        remove_cgroup(child, owner, timeout_s)
    kill_at, deadline = time.monotonic() + 1.0, time.monotonic() + timeout_s
    killed = False
    while os.path.isdir(path):
        try:
            os.rmdir(path)
        except FileNotFoundError:
            break
        except OSError as e:
            if time.monotonic() > deadline:
                error(f"*** {owner}: cannot remove {path}: {e}\n")
                return False
            if not killed and time.monotonic() > kill_at:
                for pid in cgroup_pids(path):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                killed = True
            time.sleep(0.05)
    return True


def cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def own_cgroup(controller: str) -> str:
    """This process's cgroup v1 directory in the hierarchy of `controller`."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return os.path.join(CGROUP_ROOT, controller, path.lstrip("/"))
    return os.path.join(CGROUP_ROOT, controller)


def usable_cgroups(dirs: list[str]) -> list[str]:
    """The existing ones, each hierarchy once (cpu and cpuacct may be one mount), and cpuset
    only with CPUs assigned (an empty cpuset refuses tasks)."""
    out, seen = [], set()
    for d in dirs:
        real = os.path.realpath(d)
        if not os.path.isdir(d) or real in seen:
            continue
        cpus = os.path.join(d, "cpuset.cpus")
        if os.path.exists(cpus) and not _read(cpus):
            continue
        seen.add(real)
        out.append(d)
    return out


def limit_hosts(topo: Topo, limits: dict[str, dict[str, Any]] | None = None) -> Topo:
    """Hosts declaring `cpu` or `mem_mb` (in the topology or in `limits`, host -> params,
    which win) become LimitedHosts. Changes the topology's node info in place."""
    limits = limits or {}
    unknown = sorted(set(limits) - set(topo.hosts()))
    if unknown:
        raise ValueError(f"resource limits for unknown host(s) {unknown}; hosts: "
                         f"{sorted(topo.hosts())}")
    for h in topo.hosts():
        info = topo.nodeInfo(h)
        info.update({k: v for k, v in limits.get(h, {}).items() if v is not None})
        if any(info.get(k) is not None for k in RESOURCES):
            if info.get("cls") not in (None, LimitedHost):
                raise ValueError(f"host {h}: resource limits need the LimitedHost class, "
                                 f"it declares {info['cls'].__name__}")
            info["cls"] = LimitedHost
    return topo


@dataclass
class Network:
    """A started Mininet net and the backend that shapes its links."""

    net: Mininet
    caps: Capabilities
    links: LinkBackend
    not_applied: list[dict] = field(default_factory=list)
    kind = "mininet"

    # -- run-time link changes (see testbed.emu.links) ---------------------------------------------
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
        out = {}
        for h in self.net.hosts:
            if h.params.get("role") == "relay":
                continue
            out[h.name] = {"role": h.params.get("role"), "ip": h.IP(),
                           **{k: h.params[k] for k in RESOURCES if h.params.get(k) is not None}}
            if isinstance(h, LimitedHost):
                out[h.name].update(h.limits())
        return out

    def oom_kills(self, host: str) -> int:
        h = self.net.get(host)
        return h.oom_kills() if isinstance(h, LimitedHost) else 0

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


def start_net(net: Mininet, links: LinkBackend) -> None:
    """Build and start `net` and its link backend; on any failure stop what was started
    before raising (one machine's Mininet or the cluster edition alike)."""
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


def build_network(topo: Topo, caps: Capabilities, *, link_backend: str = "auto",
                  verbosity: str = "warning",
                  limits: dict[str, dict[str, Any]] | None = None) -> Network:
    """Build and start the net. On any failure what was built is stopped before raising.
    `limits`: host -> {"cpu": fraction, "mem_mb": MiB}, over what the topology declares."""
    if os.geteuid() != 0:
        raise PermissionError("building a Mininet network needs root: run with sudo")
    setLogLevel(verbosity)
    links = choose_backend(caps.netem, link_backend)
    topo = links.prepare(limit_hosts(topo, limits))
    switch = OVSBridge if caps.ovs else LinuxBridge
    net = Mininet(topo=topo, host=IPv4Host, switch=switch, controller=None, link=ShapedLink,
                  autoSetMacs=True, build=False, waitConnected=False)
    start_net(net, links)
    return Network(net=net, caps=caps, links=links)
