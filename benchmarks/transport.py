#!/usr/bin/env python3
"""Transport: sledge's wire protocol against torch.distributed gloo send/recv on loopback TCP.

The controller (this process) owns only the schedule and the arithmetic; each method runs in its
own pair of worker processes (1 torch thread each) that stay up for the whole run and take
commands over a pipe. Rank 0 measures, rank 1 answers:
- latency: ping-pong, request and reply of equal size (activation forward, gradient back);
  reported as the median round trip and the effective throughput 2*size/RTT.
- throughput: a one-way stream of back-to-back messages, closed by a one-byte ack.
Methods: sledge's Endpoint as shipped (DEALER -> ROUTER) with a node's default transport
settings (nodes.settings.Transport: receive memory reused) over plain TCP (a run's --insecure);
the same with CURVE and the ZAP gatekeeper as every run uses by default (``sledge+curve``; its
cost is the ratio sledge+curve/sledge); the same with the opt-out
``transport.reuse_receive_memory=false`` (``sledge-reuse``); and gloo. They alternate size by
size and their order flips every
repetition, so each ratio compares measurements taken seconds apart under the same background
load. A ratio is method/gloo of throughput (latency: of 2*size/RTT), so >= 1.00 is parity; the
tables give the median of the per-repetition ratios. CPU time per message (both processes, all
threads) is recorded too: it is steadier than wall time on a shared machine.

    .venv/bin/python benchmarks/transport.py [--quick] [--out benchmarks/results/transport.json]
                                            [--baseline REV]  # add nodes/protocol.py at git REV
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


KIB, MIB = 1024, 1024 * 1024
SIZES = (64 * KIB, 256 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB)
MODES = ("latency", "throughput")
# Repetitions and bytes per measurement: a full run takes 70 s on 2 cores (with --baseline 2 min),
# --quick 20 s.
PLANS = {False: {"reps": 5, "latency_bytes": 256 * MIB, "stream_bytes": 384 * MIB, "min_n": 6},
         True: {"reps": 1, "latency_bytes": 32 * MIB, "stream_bytes": 48 * MIB, "min_n": 3}}
MAX_N = {"latency": 300, "throughput": 2000}
REPLY_TIMEOUT_S = 120.0
REFERENCE = "gloo"  # ratios are against this method, which runs last in the dict


def _curve_keys() -> dict[str, dict[str, Any]]:
    """A keypair each for the client and the server, each knowing both (protocol.Security)."""
    import zmq
    pairs = {n: [k.decode() for k in zmq.curve_keypair()] for n in ("client", "server")}
    keys = {n: pub for n, (pub, _) in pairs.items()}
    return {n: {"public": pub, "secret": sec, "keys": keys} for n, (pub, sec) in pairs.items()}


CURVE = "sledge+curve"
# Each sledge method reads its transport section as a node does (absent: the defaults).
DEFAULT_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sledge": ("sledge", {}),
    CURVE: ("sledge", {"curve": _curve_keys()}),
    **({"sledge-reuse": ("sledge", {"transport": {"reuse_receive_memory": False}})}
       if platform.libc_ver()[0] == "glibc" else {}),
    REFERENCE: ("gloo", {})}


def counts(nbytes: int, quick: bool) -> dict[str, tuple[int, int]]:
    """(timed, warm-up) message counts per mode for one size."""
    plan = PLANS[quick]
    out = {}
    for mode, budget in (("latency", plan["latency_bytes"] // 2),
                         ("throughput", plan["stream_bytes"])):
        n = max(plan["min_n"], min(MAX_N[mode], budget // nbytes))
        out[mode] = (n, max(2, n // 10))
    return out


# ---------------------------------------------------------------- peers (run in the workers)


class SledgePeer:
    """A DEALER (rank 0, the client) and a ROUTER (rank 1, the server), as nodes use them."""

    def __init__(self, rank: int, conn: Connection, path: str | None = None,
                 transport: dict[str, Any] | None = None,
                 curve: dict[str, Any] | None = None) -> None:
        import torch
        import zmq

        from nodes.settings import Transport
        if path:  # a baseline protocol module loaded from a file, e.g. an older git revision
            spec = importlib.util.spec_from_file_location("sledge_protocol_baseline", path)
            proto = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(proto)  # registered first: dataclasses look the module up
        else:
            from nodes import protocol as proto
        # As nodes.runtime.run_node does, before the first socket.
        if (Transport.model_validate(transport or {}).reuse_receive_memory
                and not proto.reuse_receive_memory()):
            raise RuntimeError("reuse_receive_memory() is not supported here")
        self.torch, self.rank, self.ctx = torch, rank, zmq.Context()
        kind, name = ("dealer", "client") if rank == 0 else ("router", "server")
        kw: dict[str, Any] = {}
        self.gatekeeper = None
        if curve:  # as a run's nodes: CURVE keys, and the server's ZAP gatekeeper
            kw["security"] = proto.Security.from_dict(curve[name])
            if rank == 1:
                self.gatekeeper = kw["gatekeeper"] = proto.Gatekeeper(self.ctx, kw["security"])
        self.ep = proto.Endpoint(self.ctx, kind, name, send_timeout_s=REPLY_TIMEOUT_S, **kw)
        if rank == 1:
            self.ep.bind("tcp://127.0.0.1:*")
            conn.send(self.ep.last_endpoint)
            self.ep.recv(REPLY_TIMEOUT_S)  # HELLO: now the router can address the client
        else:
            self.ep.connect(conn.recv(), *(["server"] if curve else []))
            self.ep.send("HELLO")

    def _tensor(self, nbytes: int) -> Any:
        return self.torch.full((nbytes // 4,), 1.5)  # written once, so its pages are resident

    def latency(self, nbytes: int, n: int, warm: int) -> list[float] | None:
        x, ep, clock = self._tensor(nbytes), self.ep, time.perf_counter
        rtts = []
        for i in range(warm + n):
            if self.rank == 1:
                peer, msg = ep.recv(None)
                ep.send("GRAD", to=peer, step=i, tensors={"g": x})
                continue
            t0 = clock()
            ep.send("ACT", step=i, tensors={"x": x})
            _, msg = ep.recv(None)  # held until the next reply, as an activation awaits backward
            rtts.append(clock() - t0)
            if msg.type != "GRAD" or msg.tensors["g"].nbytes != nbytes:
                raise RuntimeError(f"bad reply {msg.type} at step {i}")
        return rtts[warm:] if self.rank == 0 else None

    def throughput(self, nbytes: int, n: int, warm: int) -> float | None:
        x, ep = self._tensor(nbytes), self.ep
        elapsed = 0.0
        for count in (warm, n):
            t0 = time.perf_counter()
            if self.rank == 0:
                for i in range(count):
                    ep.send("ACT", step=i, tensors={"x": x})
                ep.recv(None)  # the ack: everything has arrived and been decoded
            else:
                for _ in range(count):
                    peer, msg = ep.recv(None)
                ep.send("CTRL", to=peer)
            elapsed = time.perf_counter() - t0
        return elapsed if self.rank == 0 else None

    def close(self) -> None:
        self.ep.close()
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
        self.ctx.term()


class GlooPeer:
    """torch.distributed gloo, world of 2; receives into one preallocated buffer, as gloo must."""

    def __init__(self, rank: int, conn: Connection) -> None:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        import torch
        import torch.distributed as dist
        timeout = timedelta(seconds=REPLY_TIMEOUT_S)
        if rank == 1:
            store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=timeout,
                                  wait_for_workers=False)  # rank 0 needs the port first
            conn.send(store.port)
        else:
            store = dist.TCPStore("127.0.0.1", conn.recv(), 2, False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=2, timeout=timeout)
        self.torch, self.dist, self.rank, self.other = torch, dist, rank, 1 - rank
        self.ack = torch.zeros(1, dtype=torch.uint8)

    def latency(self, nbytes: int, n: int, warm: int) -> list[float] | None:
        x, buf = self.torch.full((nbytes // 4,), 1.5), self.torch.empty(nbytes // 4)
        send, recv, other, clock = self.dist.send, self.dist.recv, self.other, time.perf_counter
        rtts = []
        for _ in range(warm + n):
            if self.rank == 1:
                recv(buf, other)
                send(x, other)
                continue
            t0 = clock()
            send(x, other)
            recv(buf, other)
            rtts.append(clock() - t0)
        return rtts[warm:] if self.rank == 0 else None

    def throughput(self, nbytes: int, n: int, warm: int) -> float | None:
        x, buf = self.torch.full((nbytes // 4,), 1.5), self.torch.empty(nbytes // 4)
        elapsed = 0.0
        for count in (warm, n):
            t0 = time.perf_counter()
            for _ in range(count):
                if self.rank == 0:
                    self.dist.send(x, self.other)
                else:
                    self.dist.recv(buf, self.other)
            if self.rank == 0:
                self.dist.recv(self.ack, self.other)
            else:
                self.dist.send(self.ack, self.other)
            elapsed = time.perf_counter() - t0
        return elapsed if self.rank == 0 else None

    def close(self) -> None:
        self.dist.destroy_process_group()


PEERS = {"sledge": SledgePeer, "gloo": GlooPeer}


def _worker(kind: str, options: dict[str, Any], rank: int, conn: Connection) -> None:
    import torch
    torch.set_num_threads(1)
    peer = PEERS[kind](rank, conn, **options)
    conn.send("ready")
    while (cmd := conn.recv()) != "stop":
        mode, nbytes, n, warm = cmd
        c0 = time.process_time()  # all threads of this process: I/O and gc threads too
        out = getattr(peer, mode)(nbytes, n, warm)
        conn.send((out, (time.process_time() - c0) / (n + warm)))
    peer.close()
    conn.send("closed")


# ---------------------------------------------------------------- controller


class Pair:
    """The two worker processes of one method; rank 1 hands its address to rank 0 through us.

    Construction starts them; ``connect`` waits for them, so several pairs import torch at once.
    """

    def __init__(self, kind: str, options: dict[str, Any]) -> None:
        ctx = mp.get_context("spawn")  # fresh interpreters: no inherited threads or sockets
        self.kind = kind
        self.conns: list[Connection] = []  # [rank 1, rank 0]
        self.procs: list[Any] = []
        try:
            for rank in (1, 0):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(kind, options, rank, theirs),
                                   daemon=True)
                self.conns.append(ours)
                self.procs.append(proc)
                proc.start()
                theirs.close()  # the child has its copy; ours must see EOF if the child dies
        except BaseException:
            self.close()
            raise

    def connect(self) -> None:
        self.conns[1].send(self._get(0))
        if [self._get(0), self._get(1)] != ["ready", "ready"]:
            raise RuntimeError(f"{self.kind} workers did not start")

    def _get(self, i: int) -> Any:
        if not self.conns[i].poll(REPLY_TIMEOUT_S):
            raise TimeoutError(f"worker pid {self.procs[i].pid} silent for {REPLY_TIMEOUT_S}s")
        return self.conns[i].recv()

    def run(self, mode: str, nbytes: int, n: int, warm: int) -> tuple[Any, float]:
        """Rank 0's measurement, and CPU seconds per message summed over both ranks."""
        for c in self.conns:
            c.send((mode, nbytes, n, warm))
        (_, cpu1), (out, cpu0) = self._get(0), self._get(1)
        return out, cpu0 + cpu1

    def close(self) -> None:
        for i, c in enumerate(self.conns):
            try:
                c.send("stop")
                self._get(i)
            except (OSError, EOFError, TimeoutError):
                pass
        for p in self.procs:
            if p.pid is None:
                continue  # never started
            p.join(10)
            if p.is_alive():
                p.kill()  # only our own worker, by its handle
                p.join()


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def _summarise(mode: str, nbytes: int, n: int, runs: list[tuple[Any, float]]) -> tuple[
        dict[str, Any], list[float]]:
    """One method's cell for one size and mode, and its per-repetition MB/s."""
    cpu = statistics.median(c for _, c in runs) * 1e6
    if mode == "latency":
        speeds = [2 * nbytes / statistics.median(r) / 1e6 for r, _ in runs]
        pooled = [s * 1e6 for r, _ in runs for s in r]
        return {"rtt_us": statistics.median(pooled), "rtt_us_p10": _pct(pooled, 0.1),
                "rtt_us_p90": _pct(pooled, 0.9), "mbps": statistics.median(speeds),
                "samples": len(pooled), "cpu_us_per_msg": cpu}, speeds
    speeds = [n * nbytes / s / 1e6 for s, _ in runs]
    return {"mbps": statistics.median(speeds), "mbps_reps": speeds, "messages": n,
            "cpu_us_per_msg": cpu}, speeds


def measure(sizes: tuple[int, ...] = SIZES, *, quick: bool = False, reps: int | None = None,
            methods: dict[str, tuple[str, dict[str, Any]]] | None = None,
            log: Any = None) -> dict[str, Any]:
    """Run every method on every size and mode; return the JSON-ready results."""
    methods = methods or DEFAULT_METHODS
    if REFERENCE not in methods:
        raise ValueError(f"methods must include {REFERENCE!r}, the reference for ratios")
    from testbed.run.fidelity import background

    reps = reps or PLANS[quick]["reps"]
    quiet_before = background()  # the streams fill the cores: was anything else loading them?
    t0, load0 = time.time(), os.getloadavg()
    pairs: dict[str, Pair] = {}
    raw: dict[tuple[str, int, str], list[tuple[Any, float]]] = {}
    try:
        for name, (kind, options) in methods.items():
            pairs[name] = Pair(kind, options)
        for pair in pairs.values():
            pair.connect()
        order = list(methods)
        for rep in range(reps):
            for nbytes in sizes:
                for mode, (n, warm) in counts(nbytes, quick).items():
                    for name in order if rep % 2 == 0 else order[::-1]:
                        raw.setdefault((mode, nbytes, name), []).append(
                            pairs[name].run(mode, nbytes, n, warm))
            if log:
                log(f"repetition {rep + 1}/{reps} done at {time.time() - t0:.0f} s")
    finally:
        for pair in pairs.values():
            pair.close()
    rows = []
    for nbytes in sizes:
        for mode in MODES:
            n = counts(nbytes, quick)[mode][0]
            row: dict[str, Any] = {"size": nbytes, "mode": mode, "ratios": {}}
            speeds = {}
            for name in methods:
                row[name], speeds[name] = _summarise(mode, nbytes, n, raw[(mode, nbytes, name)])
            for name in methods:
                if name != REFERENCE:
                    r = [a / b for a, b in zip(speeds[name], speeds[REFERENCE], strict=True)]
                    row["ratios"][name] = {"median": statistics.median(r), "min": min(r),
                                           "max": max(r)}
            if CURVE in methods and "sledge" in methods:  # what authentication costs
                r = [a / b for a, b in zip(speeds[CURVE], speeds["sledge"], strict=True)]
                row["curve_vs_plain"] = {"median": statistics.median(r), "min": min(r),
                                         "max": max(r)}
            rows.append(row)
    return {"benchmark": "transport", "unit_mbps": "1e6 bytes/s", "reference": REFERENCE,
            "config": {"address": "tcp://127.0.0.1", "torch_threads": 1, "reps": reps,
                       "quick": quick, "sizes": list(sizes), "methods": list(methods)},
            "host": _host(load0), "elapsed_s": time.time() - t0, "rows": rows,
            "fidelity": {"background_before": quiet_before, "background_after": background()}}


def _host(load0: tuple[float, float, float]) -> dict[str, Any]:
    import torch
    import zmq
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "loadavg_start": load0[0], "loadavg_end": os.getloadavg()[0]}


def _fmt_size(nbytes: int) -> str:
    return f"{nbytes // MIB} MiB" if nbytes >= MIB else f"{nbytes // KIB} KiB"


def _fmt_rtt(us: float) -> str:
    return f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"


def table(result: dict[str, Any]) -> str:
    """Two markdown tables, latency then throughput: one row per size, ratios to the reference."""
    names = result["config"]["methods"]
    others = [m for m in names if m != REFERENCE]
    by = {(r["size"], r["mode"]): r for r in result["rows"]}
    out = []
    for mode, title in (("latency", "ping-pong RTT / effective MB/s"),
                        ("throughput", "one-way stream MB/s")):
        curve = [f"{CURVE}/sledge"] if CURVE in names and "sledge" in names else []
        head = [f"{mode}: size"] + names + [f"{m}/{REFERENCE}" for m in others] + curve
        out += [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for size in result["config"]["sizes"]:
            row = by[(size, mode)]
            cells = [_fmt_size(size)]
            for m in names:
                mbps = f"{row[m]['mbps']:.0f}"
                cells.append(f"{_fmt_rtt(row[m]['rtt_us'])} / {mbps}" if mode == "latency"
                             else mbps)
            cells += [f"{row['ratios'][m]['median']:.2f}" for m in others]
            cells += [f"{row['curve_vs_plain']['median']:.2f}"] if curve else []
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _baseline(rev: str, tmp: str) -> tuple[str, tuple[str, dict[str, Any]]]:
    git = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:nodes/protocol.py"],
                         capture_output=True, text=True)
    if git.returncode:
        raise SystemExit(f"--baseline {rev}: {git.stderr.strip()}")
    src = git.stdout
    path = os.path.join(tmp, "protocol_baseline.py")
    with open(path, "w") as f:
        f.write(src)
    # As of that revision nodes did not reuse receive memory: measure it as it shipped.
    return f"sledge@{rev}", ("sledge", {"path": path,
                                         "transport": {"reuse_receive_memory": False}})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 repetition, fewer bytes (~20 s)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "transport.json"))
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5, quick 1)")
    ap.add_argument("--baseline", metavar="REV",
                    help="also measure nodes/protocol.py as of this git revision")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="transport-bench-") as tmp:
        methods = dict(DEFAULT_METHODS)
        if a.baseline:
            name, spec = _baseline(a.baseline, tmp)
            methods = {**{k: v for k, v in methods.items() if k != REFERENCE}, name: spec,
                       REFERENCE: methods[REFERENCE]}
        result = measure(quick=a.quick, reps=a.reps, methods=methods,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(result))
    h = result["host"]
    print(f"Ratios: throughput of method / {REFERENCE} (latency: of 2*size/RTT), >= 1.00 is "
          f"parity; medians over {result['config']['reps']} repetition(s). "
          f"{result['elapsed_s']:.0f} s, load average {h['loadavg_start']:.2f} -> "
          f"{h['loadavg_end']:.2f} on {h['cpus']} CPUs. JSON: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
