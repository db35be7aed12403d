"""A packet capture for tests: what really crossed a link, searchable as TCP byte streams.

Run as a program inside a Mininet host (`host.popen([python, wiretap.py, IFACE, OUT])`) it
captures every frame of one interface, both directions, with a raw AF_PACKET socket, until
SIGTERM; it prints "ready" once capturing and, at exit, a JSON line with the kernel's
packet and drop counts. As a module it reads such a capture back and reassembles each TCP
direction into contiguous byte streams (by sequence number, so segmentation, GSO and
retransmissions do not matter) in which a test can look for exact byte patterns.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import sys
from collections import defaultdict

ETH_P_ALL, SOL_PACKET, PACKET_STATISTICS = 0x0003, 263, 6
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux; not exported by every Python
Flow = tuple[str, int, str, int]  # src ip, src port, dst ip, dst port


def capture(iface: str, out_path: str) -> None:
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)  # root: past rmem_max
    s.bind((iface, 0))
    s.settimeout(0.2)
    with open(out_path, "wb") as out:
        print("ready", flush=True)
        while True:
            try:
                frame = s.recv(1 << 18)  # a GSO frame can be ~64 KiB
            except TimeoutError:
                if stop:  # stopped, and the socket buffer is drained
                    break
                continue
            out.write(struct.pack("!I", len(frame)) + frame)
    packets, drops = struct.unpack("II", s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
    print(json.dumps({"packets": packets, "drops": drops}), flush=True)


def read_frames(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    frames, i = [], 0
    while i < len(data):
        (n,) = struct.unpack_from("!I", data, i)
        frames.append(data[i + 4:i + 4 + n])
        i += 4 + n
    return frames


def tcp_segments(frames: list[bytes]) -> dict[Flow, list[tuple[int, bytes, bool]]]:
    """Per flow: (sequence number, payload, SYN) of every IPv4 TCP frame."""
    flows: dict[Flow, list[tuple[int, bytes, bool]]] = defaultdict(list)
    for f in frames:
        if len(f) < 34 or f[12:14] != b"\x08\x00" or f[23] != 6:  # Ethernet, IPv4, TCP
            continue
        ihl = (f[14] & 0x0F) * 4
        (total,) = struct.unpack_from("!H", f, 16)
        end = 14 + total if total else len(f)  # a GSO frame past 64 KiB says 0
        t = 14 + ihl
        sport, dport, seq = struct.unpack_from("!HHI", f, t)
        doff = (f[t + 12] >> 4) * 4
        syn = bool(f[t + 13] & 0x02)
        src, dst = socket.inet_ntoa(f[26:30]), socket.inet_ntoa(f[30:34])
        flows[(src, sport, dst, dport)].append((seq, f[t + doff:end], syn))
    return flows


def streams(frames: list[bytes]) -> dict[Flow, list[bytes]]:
    """Per TCP direction that carried data, its payload as contiguous chunks in stream order
    (one chunk when nothing was missed; a gap in the capture starts a new chunk)."""
    out: dict[Flow, list[bytes]] = {}
    for flow, segs in tcp_segments(frames).items():
        syn = [seq for seq, _, is_syn in segs if is_syn]
        isn = (syn[0] + 1) if syn else min(seq for seq, _, _ in segs)
        pieces = sorted(((seq - isn) % (1 << 32), data) for seq, data, _ in segs if data)
        if not pieces:  # e.g. a refused connect: SYN, RST and nothing else
            continue
        chunks: list[bytearray] = []
        end = None
        for off, data in pieces:
            if end is not None and off <= end:
                if off + len(data) > end:  # a retransmission may overlap what we have
                    chunks[-1] += data[end - off:]
                    end = off + len(data)
            else:
                chunks.append(bytearray(data))
                end = off + len(data)
        out[flow] = [bytes(c) for c in chunks]
    return out


def occurrences(chunks: dict[Flow, list[bytes]], pattern: bytes) -> int:
    return sum(c.count(pattern) for cs in chunks.values() for c in cs)


if __name__ == "__main__":
    capture(sys.argv[1], sys.argv[2])
