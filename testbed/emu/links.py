"""How link parameters are applied to a built network, and changed while it runs.

Topologies declare links in Mininet's vocabulary; testbed.emu.linkmodel turns that into one model
(per direction: rate, delay, jitter, loss, queue). A backend makes the model real:
- `NetemBackend` where the kernel has netem: TCLink's HTB + netem, changed in place with
  `tc ... change` (never deleted and rebuilt, so tc state and traffic in flight survive).
- `RelayBackend` where it has not: a relay node in the middle of each shaped link
  (h1 - x1 - s1); testbed.emu.relay applies the whole model in user space and takes changes over
  each link's control socket. One relay process per CPU serves all links (it enters each relay
  node's namespace to open that link's sockets); `RelayBackend(processes=0)` gives the old
  one-process-per-link layout.
Both offer the same run-time calls: set_link, link_down / link_up, and replay of a trace.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import shutil
import subprocess
import threading
import time
from dataclasses import replace
from typing import Any

from testbed.emu.linkmodel import Direction, LinkParams
from testbed.emu.owned import owned_tmpdir
from testbed.emu.relay import LinkSpec, RelayControl, relay_command, shared_relay_command
from testbed.emu.topolib import Topo

# How many relay processes share the shaped links when the caller does not say (0: one per
# link, the layout before the shared relay; unset: one per CPU).
RELAY_PROCESSES_ENV = "SLEDGE_RELAY_PROCESSES"
SHAPING_KEYS = ("bw", "delay", "jitter", "loss", "max_queue_size")


def shaping_params(info: dict) -> dict[str, Any]:
    """The link-model keys of a topology link's info (including `_up` / `_down` variants)."""
    return {k: v for k, v in info.items()
            if k in SHAPING_KEYS or k.rsplit("_", 1)[0] in SHAPING_KEYS}


def is_shaped(p: LinkParams) -> bool:
    return p.up != Direction() or p.down != Direction()


@functools.cache
def relay_host_class() -> type:
    """The Mininet host class of relay nodes. Made on first use: this module is imported by
    loopback runs too (scenarios), which must not need Mininet (testbed.emu.topolib)."""
    from mininet.node import Host

    class RelayHost(Host):
        """A namespace whose two interfaces are bridged by a relay process: no IP, no IPv6."""

        def config(self, **params: Any) -> dict:
            r = super().config(**params)
            for intf in self.intfList():
                if intf.name != "lo":
                    self.cmd("ip addr flush dev", intf.name)
            self.cmd("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
                     "net.ipv6.conf.default.disable_ipv6=1")
            return r

    RelayHost.__qualname__ = "RelayHost"  # as if at module level, in logs and reprs
    return RelayHost


def copy_nodes(topo: Topo) -> Topo:
    """A new topology with `topo`'s hosts and switches and no links: a backend builds its own
    links into it and leaves the caller's topology as declared (a scenario's plan, the
    report and the routing read the declared link parameters from it)."""
    out = Topo()
    for n in topo.nodes():
        if topo.isSwitch(n):
            out.addSwitch(n, **{k: v for k, v in topo.nodeInfo(n).items() if k != "isSwitch"})
        else:
            out.addHost(n, **topo.nodeInfo(n))
    return out


class LinkBackend:
    name = ""

    def __init__(self) -> None:
        self.params: dict[tuple[str, str], LinkParams] = {}   # the links this backend shapes
        self.declared: list[tuple[str, str, LinkParams]] = []  # every topology link, as declared

    def _key(self, a: str, b: str) -> tuple[tuple[str, str], bool]:
        if (a, b) in self.params:
            return (a, b), False
        if (b, a) in self.params:
            return (b, a), True
        raise KeyError(f"no shaped link between {a!r} and {b!r}; links: {sorted(self.params)}")

    def prepare(self, topo: Topo) -> Topo:
        """Return the topology to build (may add nodes); remember each link's parameters."""
        raise NotImplementedError

    def start(self, net: Any) -> None:
        pass

    def stop(self) -> None:
        pass

    def apply(self, key: tuple[str, str], params: LinkParams) -> None:
        raise NotImplementedError

    def set_status(self, key: tuple[str, str], up: bool) -> None:
        raise NotImplementedError

    # -- run-time calls, the same for every backend ----------------------------------------
    def set_link(self, a: str, b: str, **mininet_params: Any) -> LinkParams:
        """Change the a-b link; only the given parameters change. Returns the new model."""
        key, flipped = self._key(a, b)
        cur = self.params[key]
        if flipped:  # the caller's "up" (a -> b) is the declared link's "down"
            mininet_params = {_flip(k): v for k, v in mininet_params.items()}
        given = LinkParams.from_mininet(**mininet_params)
        raw = set(mininet_params)
        new = LinkParams(up=_merge(cur.up, given.up, raw, "up"),
                         down=_merge(cur.down, given.down, raw, "down"))
        self.apply(key, new)
        self.params[key] = new
        return new

    def link_down(self, a: str, b: str) -> None:
        self.set_status(self._key(a, b)[0], False)

    def link_up(self, a: str, b: str) -> None:
        self.set_status(self._key(a, b)[0], True)

    def replay(self, a: str, b: str, trace_csv: str) -> TraceThread:
        """Apply a CSV trace (column `time_s`, then Mininet link keys) in a daemon thread."""
        rows = load_trace(trace_csv)

        def run() -> None:
            t0 = time.monotonic()
            for t, params in rows:
                time.sleep(max(0.0, t0 + t - time.monotonic()))
                self.set_link(a, b, **params)
                th.applied.append((time.time(), params))

        th = TraceThread(target=run, name=f"trace {a}-{b}", daemon=True)
        th.start()
        return th


class TraceThread(threading.Thread):
    """A trace being replayed. `applied`: (wall-clock time the row was in effect, its params)
    per row so far; a row takes effect when the backend's change returns, which on a slow
    host (the netem backend goes through each node's shell) is later than its `time_s`."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.applied: list[tuple[float, dict[str, Any]]] = []


_FIELD = {"bw": "bw_mbit", "delay": "delay_ms", "jitter": "jitter_ms", "loss": "loss",
          "max_queue_size": "queue_bytes"}


def _flip(key: str) -> str:
    base, _, side = key.rpartition("_")
    return {"up": f"{base}_down", "down": f"{base}_up"}.get(side, key) if base else key


def _merge(cur: Direction, given: Direction, raw: set[str], side: str) -> Direction:
    changes = {f: getattr(given, f) for k, f in _FIELD.items() if k in raw or f"{k}_{side}" in raw}
    return replace(cur, **changes)


def load_trace(path: str) -> list[tuple[float, dict[str, Any]]]:
    """Rows of (time in s, Mininet link params); errors name the row and column."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "time_s" not in reader.fieldnames:
            raise ValueError(f"trace {path}: needs a 'time_s' column, has {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            try:
                t = float(row.pop("time_s"))
                params = {k: float(v) if k in ("bw", "loss") else v
                          for k, v in row.items() if v not in ("", None)}
                LinkParams.from_mininet(**params)  # validate now, not mid-experiment
            except ValueError as e:
                raise ValueError(f"trace {path} line {i}: {e}") from None
            rows.append((t, params))
    return sorted(rows, key=lambda r: r[0])


CUMULATIVE = ("packets", "bytes", "drops", "requeues")


def netem_counters(pid: int, dev: str, node: Any = None) -> dict[str, int]:
    """The netem qdisc's counters on `dev`, read in the namespace of process `pid` with
    `tc -s -j` (mnexec -a: a node's shell is not safe to share with a scenario's thread).
    A `node` on another server (Mininet's cluster edition) is read there, over SSH."""
    cmd = ["mnexec", "-a", str(pid), "tc", "-s", "-j", "qdisc", "show", "dev", dev]
    if getattr(node, "isRemote", False):
        out = node.rcmd(cmd, tt=False)
        if not out.lstrip().startswith("["):
            raise OSError(f"tc -s qdisc show dev {dev} on {node.server}: {out.strip()}")
    else:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            raise OSError(f"tc -s qdisc show dev {dev}: {res.stderr.strip()}")
        out = res.stdout
    for q in json.loads(out or "[]"):
        if q.get("kind") == "netem":
            return {k: int(q.get(k, 0)) for k in (*CUMULATIVE, "backlog", "qlen")}
    raise OSError(f"no netem qdisc on {dev}")


class NetemBackend(LinkBackend):
    """TCLink's HTB + netem, changed in place with `tc ... change`."""

    name = "netem"

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[tuple[str, str], dict[str, int]] = {}
        self._down: set[tuple[str, str]] = set()   # links cut by link_down

    def prepare(self, topo: Topo) -> Topo:
        out = copy_nodes(topo)  # the caller's topology keeps its links' parameters
        for n1, n2, info in topo.links(sort=True, withInfo=True):
            p = LinkParams.from_mininet(**shaping_params(info))
            self.params[(n1, n2)] = p
            self.declared.append((n1, n2, p))
            rest = {k: v for k, v in info.items()
                    if k not in shaping_params(info) and k not in ("node1", "node2")}
            # TCLink shapes each interface's egress: node1's is "up", node2's is "down".
            out.addLink(n1, n2, **rest, params1=p.up.tc_kwargs(always_delay=True),
                        params2=p.down.tc_kwargs(always_delay=True))
        return out

    def start(self, net: Any) -> None:
        self.net = net

    def _intfs(self, key: tuple[str, str]) -> tuple[Any, Any]:
        a, b = self.net.get(key[0]), self.net.get(key[1])
        (ia, ib), *_ = a.connectionsTo(b)
        return ia, ib

    def apply(self, key: tuple[str, str], params: LinkParams) -> None:
        for intf, d in zip(self._intfs(key), (params.up, params.down), strict=True):
            if d.bw_mbit:
                intf.tc(f"%s class change dev %s parent 5:0 classid 5:1 htb rate {d.bw_mbit}Mbit "
                        "burst 15k")
            parent = "parent 5:1" if d.bw_mbit else "root"
            # A cut link keeps its model and loses every frame until it is up again.
            netem = d.netem_args(loss=1.0 if key in self._down else None)
            # Mininet's Intf.tc() %-formats the command: the loss percent must be escaped.
            intf.tc(f"%s qdisc change dev %s {parent} handle 10: netem "
                    + netem.replace("%", "%%"))

    def set_status(self, key: tuple[str, str], up: bool) -> None:
        # A cut is 100 % loss, not `ifconfig down`: the interfaces stay up, so the hosts keep
        # their routes and addresses and traffic simply stops, as it does through the relay
        # (a downed interface makes senders fail at once with "Network is unreachable").
        if up:
            self._down.discard(key)
        else:
            self._down.add(key)
        self.apply(key, self.params[key])

    def stats(self, window: bool = False) -> dict[str, dict]:
        """Every shaped link's netem qdisc counters by link ("a-b") and direction: frames and
        bytes sent, drops (netem counts its loss model's and its queue limit's together),
        requeues, and the backlog at this moment. `window`: the counters since the last such
        call. The kernel keeps no per-frame lateness, so netem has no lateness to report."""
        out = {}
        for key in self.params:
            link = f"{key[0]}-{key[1]}"
            out[link] = {"params": self.params[key].to_dict()}
            for d, intf in zip(("up", "down"), self._intfs(key), strict=True):
                now = netem_counters(intf.node.pid, intf.name, intf.node)
                last = self._last.get((link, d), {}) if window else {}
                out[link][d] = {k: v - last.get(k, 0) if k in CUMULATIVE else v
                                for k, v in now.items()}
                if window:
                    self._last[(link, d)] = now
        return out


class RelayBackend(LinkBackend):
    """A relay node in the middle of every shaped link (h1 - x1 - s1). By default one relay
    process per CPU serves all of them (testbed.emu.relay.Relay, one event loop, entering each
    node's namespace for its sockets); every process runs at real-time priority."""

    name = "relay"
    RT_PRIORITY = 10

    def __init__(self, processes: int | None = None) -> None:
        """`processes`: how many relay processes share the shaped links (None: one per CPU,
        at most one per link; 0: one per link, each inside its relay node, as before the
        shared relay)."""
        super().__init__()
        if processes is None and os.environ.get(RELAY_PROCESSES_ENV):
            processes = int(os.environ[RELAY_PROCESSES_ENV])  # benchmarks compare layouts
        self.processes = processes
        self.relays: dict[tuple[str, str], str] = {}
        self.procs: dict[str, Any] = {}  # relay node -> the process serving its link
        self.logs: dict[Any, str] = {}
        self.dir: str | None = None

    def prepare(self, topo: Topo) -> Topo:
        out = copy_nodes(topo)
        for i, (n1, n2, info) in enumerate(topo.links(sort=True, withInfo=True), start=1):
            rest = {k: v for k, v in info.items()
                    if k not in shaping_params(info) and k not in ("node1", "node2")}
            p = LinkParams.from_mininet(**shaping_params(info))
            self.declared.append((n1, n2, p))
            if not is_shaped(p):
                out.addLink(n1, n2, **rest)
                continue
            self.params[(n1, n2)] = p
            x = f"x{i}"
            out.addHost(x, cls=relay_host_class(), ip=None, role="relay")
            # Keep the original port numbers on n1 and n2, so interface names do not change.
            out.addLink(n1, x, port1=rest.pop("port1", None), port2=0)
            out.addLink(x, n2, port1=1, port2=rest.pop("port2", None), **rest)
            self.relays[(n1, n2)] = x
        return out

    def start(self, net: Any) -> None:
        self.dir = owned_tmpdir("links")
        items = list(self.relays.items())
        n = len(items)
        groups = n if self.processes == 0 else min(n, self.processes or os.cpu_count() or 1)
        # Round robin, so links declared together (e.g. all clients of one switch) spread
        # over the processes, and so over the cores.
        for g in range(groups):
            mine = items[g::groups]
            if self.processes == 0:  # one process per link, in the relay node (as before)
                (key, x), = mine
                host = net.get(x)
                cmd = relay_command(f"{x}-eth0", f"{x}-eth1", self._sock(x), self.params[key],
                                    rt_priority=self.RT_PRIORITY)
                popen = host.popen
            else:
                # One process for many links: it runs in the root namespace and enters each
                # relay node's namespace to open that link's two sockets.
                specs = [LinkSpec(f"{x}-eth0", f"{x}-eth1", self._sock(x), self.params[key],
                                  netns=f"/proc/{net.get(x).pid}/ns/net").to_dict()
                         for key, x in mine]
                spec_file = os.path.join(self.dir, f"relay{g}.json")
                with open(spec_file, "w") as f:
                    json.dump(specs, f)
                cmd = shared_relay_command(spec_file, rt_priority=self.RT_PRIORITY)
                popen = subprocess.Popen
            name = mine[0][1] if self.processes == 0 else f"relay{g}"
            log = open(os.path.join(self.dir, f"{name}.log"), "wb")  # noqa: SIM115
            proc = popen(cmd, stdout=log, stderr=log)
            log.close()
            self.logs[proc] = os.path.join(self.dir, f"{name}.log")
            for _, x in mine:
                self.procs[x] = proc
        deadline = time.monotonic() + 30 + n * 0.05  # a shared relay opens its links in turn
        for x, p in self.procs.items():
            while not os.path.exists(self._sock(x)):
                if p.poll() is not None or time.monotonic() > deadline:
                    with open(self.logs[p], errors="replace") as f:
                        raise RuntimeError(f"relay {x} did not start: {f.read()[-2000:]}")
                time.sleep(0.02)

    def _sock(self, x: str) -> str:
        return os.path.join(self.dir, f"{x}.sock")

    def control(self, key: tuple[str, str]) -> RelayControl:
        return RelayControl(self._sock(self.relays[key]))

    def apply(self, key: tuple[str, str], params: LinkParams) -> None:
        with self.control(key) as c:
            c.apply(params)

    def set_status(self, key: tuple[str, str], up: bool) -> None:
        with self.control(key) as c:
            c.up() if up else c.down()

    def stats(self, window: bool = False) -> dict[str, dict]:
        """Every relay's counters, lateness and CPU time by link ("a-b"); `window`: the
        lateness since the last such call (a new window starts)."""
        out = {}
        for key, x in self.relays.items():
            with self.control(key) as c:
                out[f"{key[0]}-{key[1]}"] = {"relay": x,
                                             **(c.lateness() if window else c.stats())}
        return out

    def stop(self) -> None:
        procs = list(dict.fromkeys(self.procs.values()))  # a shared relay serves many links
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except Exception:
                p.kill()
                p.wait(5)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def choose_backend(netem: bool, requested: str = "auto") -> LinkBackend:
    if requested not in ("auto", "netem", "relay"):
        raise ValueError(f"link backend {requested!r} is unknown; valid: auto, netem, relay")
    if requested == "netem" and not netem:
        raise ValueError("link backend 'netem' requested but this kernel has no netem")
    return NetemBackend() if requested == "netem" or (requested == "auto" and netem) \
        else RelayBackend()
