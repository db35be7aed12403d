"""User-space link emulator: one process per link relays Ethernet frames between two interfaces.

This kernel has no netem, so a link that needs delay, jitter or loss gets a relay node in its
middle (h1 - r1 - s1); docs/link-emulation.md has the measurements behind this design.
Division of labour: testbed.emu.linkmodel says what a link is; `Pipe` makes one direction
behave like
it (rate, drop-tail queue, propagation delay, order-keeping jitter, Bernoulli loss, counters);
`Relay` moves frames between the two AF_PACKET sockets and the pipes and answers the control
socket; `RelayControl` is the client the testbed uses from any namespace (the control socket is a
filesystem object, so it crosses network namespaces).

Run inside the relay's namespace (the interfaces need no IP address; disable IPv6 there):
    python -m testbed.emu.relay --a r1-eth0 --b r1-eth1 --control /run/r1.sock --params JSON
Frames a -> b go through `up`, b -> a through `down`. The control socket takes one JSON object
per message (SOCK_SEQPACKET) and replies with one: {"cmd": "set", "up": {...}, "down": {...}}
(fields given replace the current ones), {"cmd": "down"}, {"cmd": "up"}, {"cmd": "stats"}.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
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


class Relay:
    def __init__(self, a: str, b: str, control: str, params: LinkParams,
                 seed: int | None = None) -> None:
        rng = random.Random(seed)
        self.a, self.b = open_port(a), open_port(b)
        self.names = {self.a: a, self.b: b}
        self.pipes = {"up": Pipe(params.up, rng), "down": Pipe(params.down, rng)}
        # up: frames read on a leave on b; down: read on b, leave on a.
        self.routes = {self.a: (self.pipes["up"], self.b), self.b: (self.pipes["down"], self.a)}
        self.buf = bytearray(MAX_FRAME)
        self.control_path = control
        if os.path.exists(control):  # left behind by a relay that was killed
            os.unlink(control)
        self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctl.bind(control)  # bound last: the path appearing means the relay is ready
        self.ctl.listen(8)
        self.clients: list[socket.socket] = []

    def run(self) -> None:
        buf, mv = self.buf, memoryview(self.buf)
        ports = [self.a, self.b]
        while True:
            heads = [p.inflight[0][0] for p in self.pipes.values() if p.inflight]
            timeout = max(0.0, min(heads) - time.monotonic()) if heads else None
            readable, _, _ = select.select([*ports, self.ctl, *self.clients], [], [], timeout)
            for s in readable:
                if s in self.routes:
                    pipe, _ = self.routes[s]
                    for _ in range(BATCH):
                        try:
                            n = s.recv_into(buf, MAX_FRAME, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            break
                        except OSError:  # ENETDOWN, once, when an interface goes down
                            self._check_port(s)
                            break
                        pipe.admit(time.monotonic(), bytes(mv[:n]))
                elif s is self.ctl:
                    conn, _ = s.accept()
                    conn.setblocking(False)
                    self.clients.append(conn)
                else:
                    self._serve(s)
            now = time.monotonic()
            for pipe, out in self.routes.values():
                pipe.flush(now, out)

    def _check_port(self, s: socket.socket) -> None:
        """Down is a state a link can be in; gone means the network was torn down: leave."""
        name = self.names[s]
        try:
            socket.if_nametoindex(name)
        except OSError:
            print(f"relay: interface {name} is gone, exiting", file=sys.stderr)
            raise SystemExit(0) from None

    def _serve(self, conn: socket.socket) -> None:
        try:
            msg = conn.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            msg = b""
        if not msg:  # the client closed its end
            self.clients.remove(conn)
            conn.close()
            return
        try:
            reply = self.command(json.loads(msg))
        except (ValueError, TypeError) as e:
            reply = {"ok": False, "error": str(e)}
        with contextlib.suppress(OSError):  # the client went away; it will see no reply
            conn.send(json.dumps(reply).encode())

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
        if os.path.exists(self.control_path):
            os.unlink(self.control_path)


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
    """argv that starts a relay (run it inside the namespace holding both interfaces)."""
    cmd = [python, "-m", "testbed.emu.relay", "--a", a, "--b", b, "--control", control,
           "--params", json.dumps(params.to_dict())]
    return cmd + (["--rt-priority", str(rt_priority)] if rt_priority else [])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m testbed.emu.relay",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--a", required=True, help="interface on node1's side (a -> b is 'up')")
    ap.add_argument("--b", required=True, help="interface on node2's side")
    ap.add_argument("--control", required=True, help="path of the control socket to create")
    ap.add_argument("--params", default="{}", help='LinkParams as JSON: {"up": {...}, "down": ...}')
    ap.add_argument("--rt-priority", type=int, help="run SCHED_FIFO at this priority")
    ap.add_argument("--seed", type=int, help="seed loss and jitter for a reproducible run")
    args = ap.parse_args(argv)
    try:
        params = LinkParams.from_dict(json.loads(args.params))
    except ValueError as e:  # JSONDecodeError is one
        ap.error(f"--params: {e}")
    if args.rt_priority:  # keeps delay accurate when other work saturates the cores
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(args.rt_priority))

    def stop(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    relay = Relay(args.a, args.b, args.control, params, args.seed)
    try:
        relay.run()
    except KeyboardInterrupt:
        pass
    finally:
        relay.close()


if __name__ == "__main__":
    main()
