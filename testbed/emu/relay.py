"""User-space link emulator: a relay process moves Ethernet frames between the two interfaces
of each link it serves (one link, or many on one event loop).

This kernel has no netem, so a link that needs delay, jitter or loss gets a relay node in its
middle (h1 - r1 - s1); docs/link-emulation.md has the measurements behind this design.
Division of labour: testbed.emu.linkmodel says what a link is; `Pipe` makes one direction
behave like it (rate, drop-tail queue, propagation delay, order-keeping jitter, Bernoulli loss,
counters);
`Link` is one link's two AF_PACKET sockets, two pipes and control socket; `Relay` runs any
number of links on one event loop (epoll, a timer heap), entering each link's network namespace
to open its sockets (`LinkSpec.netns`), so one process can serve relay nodes in many
namespaces; `RelayControl` is the client the testbed uses from any namespace (the control
socket is a filesystem object, so it crosses network namespaces).

Run inside the relay's namespace (the interfaces need no IP address; disable IPv6 there):
    python -m testbed.emu.relay --a r1-eth0 --b r1-eth1 --control /run/r1.sock --params JSON
Frames a -> b go through `up`, b -> a through `down`. The control socket takes one JSON object
per message (SOCK_SEQPACKET) and replies with one: {"cmd": "set", "up": {...}, "down": {...}}
(fields given replace the current ones), {"cmd": "down"}, {"cmd": "up"}, {"cmd": "stats"}.
Many links in one process (each keeps its own control socket, so clients do not change):
    python -m testbed.emu.relay --links links.json   # [{"a", "b", "control", "params", "netns"}]
What it does not do: share anything between links but the process (no common queue or rate),
or use more than one core (run one process per core for that: testbed.emu.links).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import ctypes
import heapq
import json
import math
import os
import random
import select
import signal
import socket
import struct
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from testbed.emu.linkmodel import Direction, LinkParams

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 1, 1
PACKET_VNET_HDR = 15  # every frame is preceded by a struct virtio_net_hdr (GSO + csum metadata)
PACKET_IGNORE_OUTGOING = 23  # do not read back what we send
SO_RCVBUFFORCE = 33
VNET = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
NEEDS_CSUM = 1
GSO_TCPV4, GSO_TCPV6, GSO_ECN = 1, 4, 0x80
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80
MAX_FRAME = 1 << 18  # GSO super-packets reach 64 KB (more with BIG TCP)
BATCH = 256  # frames read per socket per wake-up, so one busy direction cannot starve the other
COUNTERS = ("packets", "bytes", "dropped_loss", "dropped_queue", "dropped_down", "tx_errors")
# Lateness of a frame: when it left minus when the link model scheduled it to leave. Counted in
# buckets (upper edges, microseconds) so that the per-frame cost is one bisect.
LATE_EDGES_US = (10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000,
                 100_000, math.inf)


class Lateness:
    """How late frames left against their schedule: a bucket histogram and the maximum."""

    def __init__(self) -> None:
        self.counts = [0] * len(LATE_EDGES_US)
        self.max_us = 0.0

    def add(self, late_s: float) -> None:
        us = late_s * 1e6
        self.counts[bisect.bisect_left(LATE_EDGES_US, us)] += 1
        if us > self.max_us:
            self.max_us = us

    def percentile(self, q: float) -> float | None:
        """The upper edge of the bucket holding the q-quantile (an upper bound), in ms."""
        n = sum(self.counts)
        if not n:
            return None
        seen = 0
        for edge, c in zip(LATE_EDGES_US, self.counts, strict=True):
            seen += c
            if seen >= q * n:
                return min(edge, self.max_us) / 1e3
        return self.max_us / 1e3

    def summary(self) -> dict[str, Any]:
        return {"frames": sum(self.counts), "p50_ms": self.percentile(0.5),
                "p99_ms": self.percentile(0.99), "max_ms": self.max_us / 1e3}


def _csum_add(data: bytes | bytearray | memoryview, s: int = 0) -> int:
    """One's-complement sum of 16-bit words, folded (not inverted)."""
    s += sum(struct.unpack(f"!{len(data) // 2}H", data))  # callers pass even lengths
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def segment(pkt: bytes) -> list[bytes]:
    """Split a TCP GSO super-packet (vnet header + frame) into the MTU frames a NIC would send,
    so that loss hits single segments, not bursts of ~40. Anything else is returned whole.
    Segments carry NEEDS_CSUM with the pseudo-header sum in place, as the kernel's own do."""
    _, gso, _, mss, _, _ = VNET.unpack_from(pkt)
    f = memoryview(pkt)[VNET.size:]
    l3 = 18 if f[12:14] == b"\x81\x00" else 14
    v6 = gso & ~GSO_ECN == GSO_TCPV6
    if gso & ~GSO_ECN not in (GSO_TCPV4, GSO_TCPV6) or not mss or (v6 and f[l3 + 6] != 6):
        return [pkt]
    l4 = l3 + 40 if v6 else l3 + (f[l3] & 0x0F) * 4
    hl = l4 + (f[l4 + 12] >> 4) * 4
    seq = int.from_bytes(f[l4 + 4:l4 + 8], "big")
    ip_id = int.from_bytes(f[l3 + 4:l3 + 6], "big")
    addrs = f[l3 + 8:l3 + 40] if v6 else f[l3 + 12:l3 + 20]
    vh = VNET.pack(NEEDS_CSUM, 0, 0, 0, l4, 16)
    payload, out = f[hl:], []
    for i, off in enumerate(range(0, len(payload), mss)):
        chunk = payload[off:off + mss]
        h = bytearray(f[:hl])
        if v6:
            h[l3 + 4:l3 + 6] = (hl - l3 - 40 + len(chunk)).to_bytes(2, "big")
        else:
            h[l3 + 2:l3 + 4] = (hl - l3 + len(chunk)).to_bytes(2, "big")
            h[l3 + 4:l3 + 6] = ((ip_id + i) & 0xFFFF).to_bytes(2, "big")
            h[l3 + 10:l3 + 12] = b"\0\0"
            h[l3 + 10:l3 + 12] = (~_csum_add(h[l3:l4]) & 0xFFFF).to_bytes(2, "big")
        h[l4 + 4:l4 + 8] = ((seq + off) & 0xFFFFFFFF).to_bytes(4, "big")
        if off + mss < len(payload):
            h[l4 + 13] &= ~(TCP_FIN | TCP_PSH) & 0xFF
        if i:
            h[l4 + 13] &= ~TCP_CWR & 0xFF
        pseudo = _csum_add(addrs, 6 + hl - l4 + len(chunk))
        h[l4 + 16:l4 + 18] = pseudo.to_bytes(2, "big")
        out.append(vh + h + chunk)
    return out


def wire_bytes(pkt: bytes) -> int:
    """Bytes the frame takes on the wire: a GSO super-packet is charged the headers of every
    segment it stands for, as tc does (qdisc_pkt_len_init)."""
    n = len(pkt) - VNET.size
    _, gso, _, mss, cstart, _ = VNET.unpack_from(pkt)
    if not gso or not mss or not cstart:
        return n
    hl = cstart + ((pkt[VNET.size + cstart + 12] >> 4) * 4 if gso & ~GSO_ECN != 5 else 8)
    return n + (math.ceil((n - hl) / mss) - 1) * hl


class Pipe:
    """One direction of the link: the model and the frames in flight, in departure order."""

    def __init__(self, d: Direction, rng: random.Random) -> None:
        self.rng = rng
        self.inflight: deque[tuple[float, bytes, int]] = deque()  # (departure, frame, wire)
        self.busy_until = 0.0  # end of the last serialisation on the link
        self.last_departure = 0.0  # FIFO clamp: jitter never reorders
        self.link_up = True
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.late = Lateness()
        self.out: socket.socket | None = None  # the port frames leave by (set by Link)
        self.scheduled = False  # the head's departure is in the relay's timer heap
        self.configure(d)

    def configure(self, d: Direction) -> None:
        """New parameters apply to frames arriving from now on; frames in flight keep theirs."""
        self.d = d
        self.rate = d.bw_mbit * 1e6 / 8 if d.bw_mbit else 0.0  # bytes/s; 0 = unlimited
        self.qlimit = d.queue_limit() or 0
        self.delay, self.jitter = d.delay_ms / 1e3, d.jitter_ms / 1e3

    def admit(self, now: float, pkt: bytes) -> None:
        if not self.link_up:
            self.counters["dropped_down"] += 1
            return
        if self.d.loss and pkt[1]:  # GSO: lose segments, not whole super-packets
            for seg in segment(pkt):
                self._admit(now, seg)
        else:
            self._admit(now, pkt)

    def _admit(self, now: float, pkt: bytes) -> None:
        # Loss on entry, as netem does: a lost frame takes no link time.
        if self.d.loss and self.rng.random() < self.d.loss:
            self.counters["dropped_loss"] += 1
            return
        size = wire_bytes(pkt) if pkt[1] else len(pkt) - VNET.size
        t = now
        if self.rate:
            # Bytes still waiting to be serialised follow from busy_until: no per-frame queue.
            backlog = (self.busy_until - now) * self.rate
            if backlog > 0 and backlog + size > self.qlimit:
                self.counters["dropped_queue"] += 1
                return
            t = self.busy_until = max(now, self.busy_until) + size / self.rate
        tx_end = t
        t += self.delay
        if self.jitter:
            t = max(tx_end, t + self.rng.uniform(-self.jitter, self.jitter))
        t = self.last_departure = max(t, self.last_departure)
        self.inflight.append((t, pkt, size))

    def flush(self, now: float, sock: socket.socket) -> None:
        q, c = self.inflight, self.counters
        while q and q[0][0] <= now:
            due, pkt, size = q.popleft()
            self.late.add(now - due)
            try:
                sock.send(pkt)
            except OSError:  # e.g. ENETDOWN: the interface was set down under us
                c["tx_errors"] += 1
                continue
            c["packets"] += 1
            c["bytes"] += size

    def set_link(self, up: bool) -> None:
        """Link down loses everything, including frames on the wire."""
        self.link_up = up
        if not up:
            self.counters["dropped_down"] += len(self.inflight)
            self.inflight.clear()
            self.busy_until = self.last_departure = 0.0


def open_port(iface: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    try:  # a deep buffer absorbs bursts while we are busy sending
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind((iface, ETH_P_ALL))
    ifindex = socket.if_nametoindex(iface)  # promiscuous while the socket lives (packet_mreq)
    s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", ifindex,
                                                                PACKET_MR_PROMISC, 0, b""))
    return s


CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def in_netns(path: str | None) -> Iterator[None]:
    """Run the body in the network namespace at `path` (e.g. /proc/PID/ns/net), then come back.
    A socket keeps the namespace it was made in, so one process can serve links whose relay
    nodes are different namespaces. setns(2) changes the calling thread only: the relay has one."""
    if path is None:
        yield
        return
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    there = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(there, CLONE_NEWNET) != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"setns {path}: {os.strerror(e)}")
        try:
            yield
        finally:
            if _libc.setns(home, CLONE_NEWNET) != 0:  # never carry on in the wrong namespace
                os._exit(70)
    finally:
        os.close(there)
        os.close(home)


@dataclass
class LinkSpec:
    """One link a relay process serves: its two interfaces (in namespace `netns`, a path to a
    namespace file; None = the relay's own), its control socket and its initial model."""

    a: str
    b: str
    control: str
    params: LinkParams
    netns: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "control": self.control,
                "params": self.params.to_dict(), "netns": self.netns}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinkSpec:
        return cls(a=d["a"], b=d["b"], control=d["control"],
                   params=LinkParams.from_dict(d.get("params") or {}), netns=d.get("netns"))


class Link:
    """One link's state inside a relay process: two ports, two pipes, its control socket and
    clients. Links share nothing but the process and its event loop: a frame read on a link's
    port goes into that link's pipe and leaves on that link's other port, never another's."""

    def __init__(self, spec: LinkSpec, rng: random.Random) -> None:
        self.spec = spec
        with in_netns(spec.netns):
            self.a = open_port(spec.a)
            try:
                self.b = open_port(spec.b)
            except OSError:
                self.a.close()
                raise
        self.names = {self.a: spec.a, self.b: spec.b}
        self.pipes = {"up": Pipe(spec.params.up, rng), "down": Pipe(spec.params.down, rng)}
        self.pipes["up"].out, self.pipes["down"].out = self.b, self.a
        # up: frames read on a leave on b; down: read on b, leave on a.
        self.routes = {self.a: self.pipes["up"], self.b: self.pipes["down"]}
        if os.path.exists(spec.control):  # left behind by a relay that was killed
            os.unlink(spec.control)
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctl.bind(spec.control)
        self.ctl.listen(8)
        self.clients: list[socket.socket] = []

    def gone(self, s: socket.socket) -> bool:
        """Down is a state a link can be in; gone means the network was torn down."""
        try:
            with in_netns(self.spec.netns):
                socket.if_nametoindex(self.names[s])
        except OSError:
            return True
        return False

    def command(self, msg: dict[str, Any]) -> dict[str, Any]:
        cmd = msg.get("cmd") if isinstance(msg, dict) else None
        if cmd == "set":
            new = {}
            for side in ("up", "down"):  # validate both before changing either
                if msg.get(side) is not None:
                    new[side] = Direction.from_dict({**self.pipes[side].d.to_dict(), **msg[side]})
            for side, d in new.items():
                self.pipes[side].configure(d)
            return {"ok": True, "params": self.params().to_dict()}
        if cmd in ("up", "down"):
            for p in self.pipes.values():
                p.set_link(cmd == "up")
            return {"ok": True, "link": cmd}
        if cmd == "stats":
            # pid and cpu_s are the process's: shared by every link it serves (`links`).
            out = {"ok": True, "pid": os.getpid(), "time": time.monotonic(),
                   "link": "up" if self.pipes["up"].link_up else "down",
                   "params": self.params().to_dict(), "cpu_s": time.process_time(),
                   **{side: {**p.counters, "in_flight": len(p.inflight),
                             "lateness": p.late.summary()}
                      for side, p in self.pipes.items()}}
            if msg.get("reset_lateness"):  # a new window (e.g. the next round) starts here
                for p in self.pipes.values():
                    p.late = Lateness()
            return out
        raise ValueError(f"unknown command {cmd!r}; valid: set, up, down, stats")

    def params(self) -> LinkParams:
        return LinkParams(up=self.pipes["up"].d, down=self.pipes["down"].d)

    def close(self) -> None:
        for s in [self.a, self.b, self.ctl, *self.clients]:
            s.close()
        self.clients.clear()
        if os.path.exists(self.spec.control):
            os.unlink(self.spec.control)


PORT, CTL, CLIENT = 0, 1, 2


class Relay:
    """Any number of links on one event loop: epoll over every port and control socket, and a
    heap of the pipes' next departures (so a wake-up costs O(log links), not O(links))."""

    def __init__(self, specs: list[LinkSpec], seed: int | None = None) -> None:
        rng = random.Random(seed)
        self.ep = select.epoll()
        self.handlers: dict[int, tuple[int, Link, Any]] = {}
        self.links: list[Link] = []
        self.timers: list[tuple[float, int, Pipe]] = []  # (departure of the head, tie, pipe)
        self.buf = bytearray(MAX_FRAME)
        try:
            for spec in specs:
                link = Link(spec, rng)
                self.links.append(link)
                for port in (link.a, link.b):
                    self._watch(port, PORT, link, (port, link.routes[port]))
                self._watch(link.ctl, CTL, link, None)
        except BaseException:
            self.close()
            raise

    def _watch(self, s: socket.socket, kind: int, link: Link, obj: Any) -> None:
        self.handlers[s.fileno()] = (kind, link, obj)
        self.ep.register(s.fileno(), select.EPOLLIN)

    def _unwatch(self, s: socket.socket) -> None:
        with contextlib.suppress(KeyError, OSError, ValueError):
            self.handlers.pop(s.fileno())
            self.ep.unregister(s.fileno())

    def run(self) -> None:
        mv = memoryview(self.buf)
        buf, timers, handlers, epfd = self.buf, self.timers, self.handlers, self.ep.fileno()
        tie = 0
        while self.links:
            # select() on the epoll fd: microsecond timeouts (epoll_wait rounds up to whole ms,
            # which would make every frame up to 1 ms late). It never holds more than this one fd.
            timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else None
            ready, _, _ = select.select([epfd], [], [], timeout)
            events = self.ep.poll(0) if ready else ()
            for fd, _ in events:
                h = handlers.get(fd)
                if h is None:  # closed earlier in this batch
                    continue
                kind, link, obj = h
                if kind == PORT:
                    s, pipe = obj
                    for _ in range(BATCH):
                        try:
                            n = s.recv_into(buf, MAX_FRAME, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            break
                        except OSError:  # ENETDOWN, once, when an interface goes down
                            if link.gone(s):
                                self._drop(link, s)
                            break
                        pipe.admit(time.monotonic(), bytes(mv[:n]))
                    if pipe.inflight and not pipe.scheduled:
                        pipe.scheduled = True
                        tie += 1
                        heapq.heappush(timers, (pipe.inflight[0][0], tie, pipe))
                elif kind == CTL:
                    conn, _ = link.ctl.accept()
                    conn.setblocking(False)
                    link.clients.append(conn)
                    self._watch(conn, CLIENT, link, conn)
                else:
                    self._serve(link, obj)
            now = time.monotonic()
            while timers and timers[0][0] <= now:
                _, _, pipe = heapq.heappop(timers)
                pipe.scheduled = False
                pipe.flush(now, pipe.out)
                if pipe.inflight:
                    pipe.scheduled = True
                    tie += 1
                    heapq.heappush(timers, (pipe.inflight[0][0], tie, pipe))

    def _drop(self, link: Link, s: socket.socket) -> None:
        """The link's interface is gone (its network was torn down): stop serving that link;
        the process leaves with its last link."""
        print(f"relay: interface {link.names[s]} is gone, exiting"
              if len(self.links) == 1 else
              f"relay: interface {link.names[s]} is gone, dropping its link", file=sys.stderr)
        for sock in [link.a, link.b, link.ctl, *link.clients]:
            self._unwatch(sock)
        for p in link.pipes.values():  # pending timers find an empty pipe and do nothing
            p.inflight.clear()
        link.close()
        self.links.remove(link)

    def _serve(self, link: Link, conn: socket.socket) -> None:
        try:
            msg = conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            msg = b""
        if not msg:  # the client closed its end
            self._unwatch(conn)
            link.clients.remove(conn)
            conn.close()
            return
        try:
            reply = link.command(json.loads(msg))
        except (ValueError, TypeError) as e:
            reply = {"ok": False, "error": str(e)}
        with contextlib.suppress(OSError):  # the client went away; it will see no reply
            conn.send(json.dumps(reply).encode())

    def close(self) -> None:
        for link in self.links:
            link.close()
        self.links.clear()
        self.ep.close()


class RelayControl:
    """Client of a relay's control socket; works from any network namespace."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path, self.timeout = path, timeout
        deadline = time.monotonic() + timeout
        while True:  # the relay may still be starting
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.sock.send(json.dumps(msg).encode())
        reply = json.loads(self.sock.recv(1 << 16))
        if not reply.get("ok"):
            raise ValueError(f"relay {self.path}: {reply.get('error')}")
        return reply

    def set(self, up: Direction | None = None, down: Direction | None = None) -> None:
        self.call({"cmd": "set", "up": up and up.to_dict(), "down": down and down.to_dict()})

    def apply(self, params: LinkParams) -> None:
        self.set(up=params.up, down=params.down)

    def down(self) -> None:
        self.call({"cmd": "down"})

    def up(self) -> None:
        self.call({"cmd": "up"})

    def lateness(self) -> dict[str, Any]:
        """The stats, and a new lateness window from now."""
        return self.call({"cmd": "stats", "reset_lateness": True})

    def stats(self) -> dict[str, Any]:
        return self.call({"cmd": "stats"})

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RelayControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def relay_command(a: str, b: str, control: str, params: LinkParams, *,
                  rt_priority: int | None = None, python: str = sys.executable) -> list[str]:
    """argv that starts a relay for one link (run it inside the namespace holding both
    interfaces)."""
    cmd = [python, "-m", "testbed.emu.relay", "--a", a, "--b", b, "--control", control,
           "--params", json.dumps(params.to_dict())]
    return cmd + (["--rt-priority", str(rt_priority)] if rt_priority else [])


def shared_relay_command(spec_file: str, *, rt_priority: int | None = None,
                         python: str = sys.executable) -> list[str]:
    """argv that starts one relay for every link in `spec_file` (a JSON list of
    LinkSpec.to_dict()); it enters each link's namespace to open its ports, so it can run in
    any namespace."""
    cmd = [python, "-m", "testbed.emu.relay", "--links", spec_file]
    return cmd + (["--rt-priority", str(rt_priority)] if rt_priority else [])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m testbed.emu.relay",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--a", help="interface on node1's side (a -> b is 'up')")
    ap.add_argument("--b", help="interface on node2's side")
    ap.add_argument("--control", help="path of the control socket to create")
    ap.add_argument("--params", default="{}", help='LinkParams as JSON: {"up": {...}, "down": ...}')
    ap.add_argument("--links", help="JSON file: a list of links to serve, each "
                                    '{"a", "b", "control", "params", "netns"} (instead of --a/--b)')
    ap.add_argument("--rt-priority", type=int, help="run SCHED_FIFO at this priority")
    ap.add_argument("--seed", type=int, help="seed loss and jitter for a reproducible run")
    args = ap.parse_args(argv)
    if args.links:
        try:
            with open(args.links) as f:
                specs = [LinkSpec.from_dict(d) for d in json.load(f)]
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--links: {e!r}")
    else:
        if not (args.a and args.b and args.control):
            ap.error("give --a, --b and --control, or --links")
        try:
            params = LinkParams.from_dict(json.loads(args.params))
        except ValueError as e:  # JSONDecodeError is one
            ap.error(f"--params: {e}")
        specs = [LinkSpec(args.a, args.b, args.control, params)]
    if args.rt_priority:  # keeps delay accurate when other work saturates the cores
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt_priority))

    def stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    relay = Relay(specs, args.seed)
    try:
        relay.run()
    except KeyboardInterrupt:
        pass
    finally:
        relay.close()


if __name__ == "__main__":
    main()
