"""Sledge wire protocol: the one place where bytes on the wire are defined.

Messages know how to become frames and back (``encode``/``decode``); Endpoints know how to move
them over one ZeroMQ socket and count every byte; nodes and schemes never see a frame.

Patterns, named as in the zguide:
- ROUTER/DEALER for addressed flows: a node that serves several peers binds a ROUTER and addresses
  each peer by its routing identity; a node that talks to one upstream connects a DEALER whose
  identity is its name. DEALER speaks first (HELLO) so the ROUTER learns its identity.
- HEARTBEAT is an ordinary small message type; liveness policy lives in the runtime.
- No REQ/REP: its strict send/recv lockstep wedges when a peer restarts mid-exchange.

A message is a multipart ZeroMQ message: frame 0 is a msgpack header, then one raw frame per
tensor, sent and received zero-copy. Everything from a peer is untrusted and bounded: decode
validates every header field and frame length and raises ProtocolError; an Endpoint drops such
messages, counts them and keeps serving. Every node calls ``reuse_receive_memory()`` once at
startup unless its config's ``transport.reuse_receive_memory`` is false (docs/transport.md has
the measurements); other processes that receive large messages should too.

Who may talk is decided here too (docs/security.md): with a ``Security`` (the run's CURVE keys),
a ROUTER serves CURVE and a ``Gatekeeper`` (the ZAP handler of the process's zmq.Context) admits
only the run's public keys and at most ``max_connections`` live connections per ROUTER; every
message then carries the key owner's name (ZAP User-Id) and a ROUTER drops a message whose claimed
identity that owner may not use. Without one (``--insecure``) the transport is plain TCP, but the
gatekeeper still bounds connections and the identity filter (``expected``) still applies.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import math
import platform
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import torch
import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
MSG_TYPES: frozenset[str] = frozenset(
    {"HELLO", "CTRL", "REPORT", "ERROR", "BYE", "HEARTBEAT", "ACT", "GRAD", "GRAD_BCAST",
     "ACT2", "GRAD2", "W_UP", "W_DOWN", "LOSS", "EVAL", "STATE", "STATE_ACK",
     "ABORTED"}
)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 1024
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024
MAX_NAME_CHARS = 128
MAX_DIMS = 8
MAX_META_KEYS = 256
MAX_META_DEPTH = 3
_INT_LIMIT = 2**63
_HEADER_KEYS = frozenset({"v", "type", "run", "round", "step", "sender", "seq", "tensors", "meta"})
# Optional: the sender's recovery epoch (docs/fault-tolerance.md), present once it is above 0, so
# a receiver can drop what a peer sent during an aborted attempt of a round.
_EPOCH_KEYS = _HEADER_KEYS | {"epoch"}
# numpy has no bfloat16; a same-width integer view carries the same bytes.
_NUMPY_VIEW: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}
# Plain ints: pyzmq's IntFlag arithmetic costs about a microsecond per frame on the hot path.
_SNDMORE, _NOBLOCK, _POLLIN = int(zmq.SNDMORE), int(zmq.NOBLOCK), int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_SLICE_MS = 100  # how often an interruptible wait checks its `interrupt`
_BYTES_KEY = {"tx": "tx_bytes", "rx": "rx_bytes"}
_MSGS_KEY = {"tx": "tx_msgs", "rx": "rx_msgs"}

# Received tensors alias read-only zmq frames by design. torch warns about that once per process;
# spend that warning here, silenced, rather than wrap every decode in warnings.catch_warnings().
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="The given buffer is not writable")
    torch.frombuffer(b"\0", dtype=torch.uint8)


class Interrupted(RuntimeError):
    """A wait given up because the endpoint's `interrupt` said so (a round being aborted)."""


class ProtocolError(ValueError):
    """A message that violates the protocol; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Message:
    """One protocol message. Tensors are insertion-ordered; meta holds small JSON-like values.

    Sending is zero-copy: the sender must not modify a tensor until it is sent (send detached or
    cloned tensors). Received tensors alias the ZeroMQ frame and are read-only by design;
    ``.clone()`` them before any in-place op.
    """

    type: str
    run: str = ""
    round: int = 0
    step: int = 0
    sender: str = ""
    seq: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0  # header frame + tensor frames, set by encode/decode
    epoch: int = 0  # recovery epoch: bumped by every rollback (docs/fault-tolerance.md)


def _field_error(name: str, expected: str, got: Any, reason: str = "bad_field") -> ProtocolError:
    return ProtocolError(reason, f"header field {name!r}: expected {expected}, got {got!r:.80}")


def _check_str(value: Any, name: str, *, allow_empty: bool = True) -> str:
    if type(value) is not str or len(value) > MAX_NAME_CHARS or (not value and not allow_empty):
        lo = 0 if allow_empty else 1
        raise _field_error(name, f"str of {lo}..{MAX_NAME_CHARS} chars", value)
    return value


def _check_int(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value < _INT_LIMIT:  # bool is not an int here
        raise _field_error(name, "int >= 0 and < 2**63", value)
    return value


def _check_meta(value: Any, path: str, depth: int) -> None:
    if value is None or type(value) in (bool, int, float, str):
        return
    if type(value) not in (list, dict):
        raise _field_error(path, "None, bool, int, float, str, list or dict", value)
    if depth > MAX_META_DEPTH:  # meta itself is depth 0
        raise _field_error(path, f"containers nested at most {MAX_META_DEPTH} deep", value)
    if type(value) is list:
        for i, item in enumerate(value):
            _check_meta(item, f"{path}[{i}]", depth + 1)
        return
    for key, item in value.items():
        if type(key) is not str:
            raise _field_error(path, "str keys", key)
        _check_meta(item, f"{path}.{key}", depth + 1)


def _parse_header(raw: Any) -> dict[str, Any]:
    """Unpack and validate a header frame; every field is checked before use."""
    try:
        # Explicit caps so a hostile header cannot make msgpack allocate beyond the header bounds.
        hdr = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, max_str_len=MAX_HEADER_BYTES, max_bin_len=0,
            max_ext_len=0, max_array_len=MAX_TENSORS, max_map_len=MAX_META_KEYS,
        )
    except Exception as exc:
        raise ProtocolError("bad_header", f"frame 0 (header): not valid msgpack: {exc}") from exc
    if type(hdr) is not dict:
        raise ProtocolError("bad_header", f"frame 0 (header): expected a map, got {hdr!r:.80}")
    if "v" in hdr and (type(hdr["v"]) is not int or hdr["v"] != PROTOCOL_VERSION):
        raise _field_error("v", f"protocol version {PROTOCOL_VERSION}", hdr["v"], "version")
    if hdr.keys() != _HEADER_KEYS and hdr.keys() != _EPOCH_KEYS:
        missing = sorted(_HEADER_KEYS - hdr.keys())
        extra = sorted(map(str, hdr.keys() - _EPOCH_KEYS))
        raise ProtocolError("bad_header", f"header keys: missing {missing}, unexpected {extra}")
    if "epoch" in hdr:
        _check_int(hdr["epoch"], "epoch")
    if type(hdr["type"]) is not str:
        raise _field_error("type", "str", hdr["type"])
    if hdr["type"] not in MSG_TYPES:
        raise _field_error("type", "a known message type", hdr["type"], "unknown_type")
    _check_str(hdr["run"], "run")
    _check_str(hdr["sender"], "sender")
    for key in ("round", "step", "seq"):
        _check_int(hdr[key], key)
    tensors = hdr["tensors"]
    if type(tensors) is not list or len(tensors) > MAX_TENSORS:
        raise _field_error("tensors", f"list of <= {MAX_TENSORS} entries", tensors)
    seen: set[str] = set()
    for i, entry in enumerate(tensors):
        where = f"tensors[{i}]"
        if type(entry) is not list or len(entry) != 4:
            raise _field_error(where, "[name, dtype, shape, nbytes]", entry)
        name, dtype, shape, nbytes = entry
        _check_str(name, f"{where}.name", allow_empty=False)
        if name in seen:
            raise _field_error(f"{where}.name", "a unique tensor name", name)
        seen.add(name)
        if type(dtype) is not str or dtype not in DTYPES:
            raise _field_error(f"{where}.dtype", f"one of {sorted(DTYPES)}", dtype, "bad_dtype")
        if (type(shape) is not list or len(shape) > MAX_DIMS
                or any(type(d) is not int or not 0 <= d < _INT_LIMIT for d in shape)):
            raise _field_error(f"{where}.shape", f"list of <= {MAX_DIMS} ints >= 0", shape,
                               "bad_shape")
        _check_int(nbytes, f"{where}.nbytes")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if nbytes != expected:
            raise _field_error(f"{where}.nbytes", f"{expected} for shape {shape} {dtype}", nbytes,
                               "bad_shape")
    meta = hdr["meta"]
    if type(meta) is not dict or len(meta) > MAX_META_KEYS:
        raise _field_error("meta", f"map of <= {MAX_META_KEYS} keys", meta)
    _check_meta(meta, "meta", 0)
    return hdr


def _tensor_buffer(t: torch.Tensor) -> Any:
    # A flat uint8 numpy view of the tensor's memory, whatever its dtype; no copy unless the
    # tensor is not contiguous or not on the CPU. numpy views cost a fraction of torch views.
    t = t.detach()
    if not (t.is_cpu and t.is_contiguous()):
        t = t.cpu().contiguous()
    view = _NUMPY_VIEW.get(t.dtype)
    return (t if view is None else t.view(view)).numpy().reshape(-1).view(np.uint8)


def encode(msg: Message) -> list[Any]:
    """Return ``[header, buffer, ...]`` for ``send_multipart(copy=False)``; sets ``msg.nbytes``."""
    entries, buffers = [], []
    for name, t in msg.tensors.items():
        if not isinstance(t, torch.Tensor):
            raise _field_error(f"tensors[{name!r}]", "torch.Tensor", type(t).__name__)
        if t.dtype not in _DTYPE_NAMES:
            raise _field_error(f"tensors[{name!r}].dtype", f"one of {sorted(DTYPES)}",
                               str(t.dtype), "bad_dtype")
        buf = _tensor_buffer(t)
        entries.append([name, _DTYPE_NAMES[t.dtype], list(t.shape), buf.nbytes])
        buffers.append(buf)
    hdr = {"v": PROTOCOL_VERSION, "type": msg.type, "run": msg.run, "round": msg.round,
           "step": msg.step, "sender": msg.sender, "seq": msg.seq, "tensors": entries,
           "meta": msg.meta}
    if msg.epoch:
        hdr["epoch"] = msg.epoch
    try:
        raw = msgpack.packb(hdr, use_bin_type=True)
    except Exception as exc:  # e.g. an object in meta msgpack cannot represent
        raise ProtocolError("bad_field", f"header field 'meta': cannot serialise: {exc}") from exc
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"frame 0 (header): {len(raw)} > {MAX_HEADER_BYTES} bytes")
    _parse_header(raw)  # the sender applies the receiver's checks: an invalid message never leaves
    msg.nbytes = len(raw) + sum(b.nbytes for b in buffers)
    return [raw, *buffers]


def _frame_view(frame: Any) -> memoryview:
    mv = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    return mv if mv.ndim == 1 and mv.format in ("B", "b", "c") else mv.cast("B")


def _rebuild(mv: memoryview, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if mv.nbytes == 0:  # frombuffer rejects empty buffers
        return torch.empty(shape, dtype=dtype)
    t = torch.frombuffer(mv, dtype=dtype)  # read-only on purpose (see the module's import)
    if t.data_ptr() % dtype.itemsize:
        # libzmq packs small messages into one receive buffer at arbitrary offsets; copy those
        # (they are small) rather than hand kernels a misaligned pointer.
        t = torch.frombuffer(bytearray(mv), dtype=dtype)
    return t.reshape(shape)


def decode(frames: list[Any], *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    """Validate and rebuild a message from ``[header, tensor...]``; tensors are not copied."""
    if not 1 <= len(frames) <= 1 + MAX_TENSORS:
        raise ProtocolError("frame_count", f"frames: expected 1..{1 + MAX_TENSORS} frames, "
                                           f"got {len(frames)}")
    views = [_frame_view(f) for f in frames]
    if views[0].nbytes > MAX_HEADER_BYTES:
        raise ProtocolError("too_large",
                            f"frame 0 (header): {views[0].nbytes} > {MAX_HEADER_BYTES} bytes")
    total = sum(v.nbytes for v in views)
    if total > max_message_bytes:
        raise ProtocolError("too_large", f"message: {total} > {max_message_bytes} bytes")
    hdr = _parse_header(views[0])
    n = len(hdr["tensors"])
    if len(frames) != 1 + n:
        raise ProtocolError("frame_count", f"frames: header declares {n} tensors, so expected "
                                           f"{1 + n} frames, got {len(frames)}")
    tensors: dict[str, torch.Tensor] = {}
    for i, (name, dtype, shape, nbytes) in enumerate(hdr["tensors"], start=1):
        if views[i].nbytes != nbytes:
            raise ProtocolError("frame_size", f"frame {i} (tensor {name!r}): expected {nbytes} "
                                              f"bytes, got {views[i].nbytes}")
        tensors[name] = _rebuild(views[i], DTYPES[dtype], shape)
    return Message(type=hdr["type"], run=hdr["run"], round=hdr["round"], step=hdr["step"],
                   sender=hdr["sender"], seq=hdr["seq"], tensors=tensors, meta=hdr["meta"],
                   nbytes=total, epoch=hdr.get("epoch", 0))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # glibc <malloc.h>


def reuse_receive_memory(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bool:
    """Per process: received frames reuse freed heap memory, not fresh pages (nodes.runtime
    calls it for every node unless ``transport.reuse_receive_memory`` is false).

    libzmq mallocs every received frame in its I/O thread. glibc serves large blocks from fresh
    mmaps (above a threshold that adapts up to 32 MiB) and gives freed memory back to the kernel,
    so each large message pays a page fault and zeroing per 4 KiB and an munmap: at 64 MiB that
    halves throughput. This keeps blocks up to a message in one reused heap: mmap and trim
    thresholds above ``max_message_bytes``, and a single malloc arena (a thread arena's heap
    stops at 64 MiB, beyond which glibc mmaps regardless). Cost: the process keeps its peak
    message memory, and all threads share one malloc lock. Call it before the process creates
    its first zmq socket (the I/O thread picks its arena on its first allocation). Returns
    False where the C library is not glibc (nothing changed) or glibc refused a setting.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    limit = max_message_bytes + MAX_HEADER_BYTES + (1 << 20)  # + slack for malloc bookkeeping
    return all([mallopt(_M_MMAP_THRESHOLD, min(limit, 2**31 - 1)),
                mallopt(_M_TRIM_THRESHOLD, min(2 * limit, 2**31 - 1)), mallopt(_M_ARENA_MAX, 1)])


@dataclass(frozen=True)
class Security:
    """The CURVE keys of one process of a run (z85 text) and what it knows of the others.

    ``public``/``secret``: its own pair; a ROUTER serves with it, a DEALER proves who it is with
    it. ``keys``: name -> public key of every process of the run (the controller as
    "controller"); a DEALER takes its server's key from here, a gatekeeper admits only these.
    ``speaks_as``: node -> the other identities it may claim (a relay dials upstream as each
    client it serves). A node always may use its own name and ``<name>#hb``.
    """

    public: str
    secret: str
    keys: dict[str, str]
    speaks_as: dict[str, list[str]] = field(default_factory=dict)

    def owner(self, public_z85: bytes) -> str | None:
        for name, key in self.keys.items():
            if key.encode() == public_z85:
                return name
        return None

    def may_claim(self, owner: str, identity: str) -> bool:
        return (identity in (owner, f"{owner}#hb")
                or identity in self.speaks_as.get(owner, ()))

    def to_dict(self) -> dict[str, Any]:
        return {"public": self.public, "secret": self.secret, "keys": dict(self.keys),
                "speaks_as": {k: list(v) for k, v in self.speaks_as.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Security | None:
        if not d:
            return None
        return cls(d["public"], d["secret"], dict(d["keys"]),
                   {k: list(v) for k, v in d.get("speaks_as", {}).items()})

    @classmethod
    def for_run(cls, names: list[str]) -> dict[str, Security]:
        """A fresh keypair for each name (the controller's included), each knowing all."""
        pairs = {n: tuple(k.decode() for k in zmq.curve_keypair()) for n in names}
        keys = {n: pub for n, (pub, _) in pairs.items()}
        return {n: cls(pub, sec, keys) for n, (pub, sec) in pairs.items()}


_ZAP_ADDR = "inproc://zeromq.zap.01"
_MONITOR_EVENTS = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
                   | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)


class Gatekeeper(threading.Thread):
    """The ZAP handler of one zmq.Context: decides every handshake on its ROUTERs.

    It admits a CURVE client whose public key belongs to the run (replying with the key owner's
    name as User-Id) and, with no security, any NULL client; in both cases only while the ROUTER
    has at most ``max_connections`` live connections, which it counts from the ROUTER's socket
    monitor (accepted minus disconnected). Every refusal, and every handshake that failed before
    reaching it (a plain peer against a CURVE server, garbage), is counted per ROUTER, by reason.
    """

    def __init__(self, zctx: zmq.Context, security: Security | None) -> None:
        super().__init__(name="zap-gatekeeper", daemon=True)
        self.security = security
        self._rep = zctx.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        self._rep.bind(_ZAP_ADDR)
        self._lock = threading.Lock()
        self._new: list[tuple[str, zmq.Socket, int]] = []  # handed over by ROUTERs
        self._monitors: dict[zmq.Socket, str] = {}
        self._limit: dict[str, int] = {}
        self._live: dict[str, set[int]] = {}
        self.rejected: dict[str, collections.Counter[str]] = {}
        self._stop_evt = threading.Event()
        self.start()

    def watch(self, domain: str, sock: zmq.Socket, max_connections: int) -> None:
        """Count `sock`'s connections (domain: its ZAP domain) and cap them."""
        mon = sock.get_monitor_socket(_MONITOR_EVENTS)
        with self._lock:
            self.rejected.setdefault(domain, collections.Counter())
            self._new.append((domain, mon, max_connections))

    def counts(self, domain: str) -> dict[str, int]:
        with self._lock:
            return dict(self.rejected.get(domain, {}))

    def _refuse(self, domain: str, reason: str) -> None:
        with self._lock:
            self.rejected.setdefault(domain, collections.Counter())[reason] += 1

    def _adopt(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for domain, mon, limit in new:
            self._monitors[mon] = domain
            self._limit[domain] = limit
            self._live.setdefault(domain, set())

    def _drain(self, mon: zmq.Socket) -> None:
        domain = self._monitors[mon]
        while True:
            try:
                frames = mon.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)
            kind, fd = event["event"], event["value"]
            if kind == zmq.EVENT_ACCEPTED:
                self._live[domain].add(fd)
            elif kind in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CLOSED):
                self._live[domain].discard(fd)
            else:  # a handshake that failed before asking us (its DISCONNECTED follows)
                self._refuse(domain, "handshake_failed")

    def _answer(self, frames: list[bytes]) -> None:
        version, request_id, domain_b, _address, _identity, mechanism, *cred = frames
        domain = domain_b.decode("utf-8", "replace")
        for mon in list(self._monitors):  # the ACCEPTED of this very connection comes first
            self._drain(mon)
        user, reason = "", ""
        if len(self._live.get(domain, ())) > self._limit.get(domain, 1 << 30):
            reason = "too_many_connections"
        elif self.security is not None:
            if mechanism != b"CURVE" or len(cred) != 1:
                reason = "auth_denied"
            else:
                user = self.security.owner(z85.encode(cred[0])) or ""
                reason = "" if user else "auth_denied"
        elif mechanism != b"NULL":
            reason = "auth_denied"
        if reason:
            self._refuse(domain, reason)
        ok = not reason
        self._rep.send_multipart([version, request_id, b"200" if ok else b"400",
                                  b"OK" if ok else reason.encode(), user.encode(), b""])

    def run(self) -> None:
        try:
            while not self._stop_evt.is_set():
                self._adopt()
                items = [(self._rep, _POLLIN), *((m, _POLLIN) for m in self._monitors)]
                for sock, _ in zmq.zmq_poll(items, 100):
                    if sock is self._rep:
                        self._answer(self._rep.recv_multipart())
                    else:
                        self._drain(sock)
        finally:
            for mon in self._monitors:
                mon.close(0)
            self._rep.close(0)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(2.0)


class Endpoint:
    """One ZeroMQ socket with sledge framing: 'router' (binds, addressed by peer identity) or
    'dealer' (connects, identity = its name).

    Not thread-safe (a ZeroMQ socket belongs to one thread). A ROUTER can only address a DEALER
    once it has heard from it, so dealers send HELLO first.
    """

    def __init__(self, ctx: zmq.Context, kind: str, name: str, *, run: str = "",
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, send_timeout_s: float = 30.0,
                 hwm: int = 1000, linger_s: float = 5.0, security: Security | None = None,
                 gatekeeper: Gatekeeper | None = None, max_connections: int = 1 << 16,
                 expected: set[str] | None = None) -> None:
        """security: CURVE as above (None: plain TCP). gatekeeper (ROUTER): the context's ZAP
        handler, which then caps this ROUTER at `max_connections` live connections. expected
        (ROUTER): the identities that may send here (None: any); others are dropped."""
        if kind not in ("router", "dealer"):
            raise ValueError(f"Endpoint kind must be 'router' or 'dealer', got {kind!r}")
        _check_str(name, "sender", allow_empty=False)
        _check_str(run, "run")
        self.kind, self.name, self.run = kind, name, run
        self.max_message_bytes = max_message_bytes
        self.send_timeout_s = send_timeout_s
        self._seq = 0
        # Recovery (docs/fault-tolerance.md): messages go out stamped with `epoch`; those from
        # an older epoch (an aborted attempt) are dropped; with `interrupt`, waits (receive, or
        # send to an absent peer) check it every 100 ms and raise Interrupted when it is true.
        self.epoch = 0
        self.interrupt: Callable[[], bool] | None = None
        self._connected: list[str] = []  # named in errors: a dealer's peer is its address
        self._bound: list[str] = []
        self.bytes_sent = self.bytes_recv = self.msgs_sent = self.msgs_recv = 0
        self.header_bytes_sent = self.header_bytes_recv = 0
        self.by_type: dict[str, dict[str, int]] = {}
        self.rejected: collections.Counter[str] = collections.Counter()
        self.security, self.gatekeeper = security, gatekeeper
        self.max_connections = max_connections
        self.expected = None if expected is None else set(expected)
        sock = ctx.socket(zmq.ROUTER if kind == "router" else zmq.DEALER)
        if security is not None:
            sock.curve_secretkey = security.secret.encode()
            sock.curve_publickey = security.public.encode()
            if kind == "router":
                sock.curve_server = True
        if kind == "router" and gatekeeper is not None:
            sock.zap_domain = name.encode()  # NULL handshakes ask the gatekeeper too
        sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        # Positive linger: closing right after a large send must still deliver it.
        sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        # libzmq drops (and disconnects) any frame above this before Python allocates it; it is
        # applied per frame, so decode still bounds the whole message.
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes + MAX_HEADER_BYTES)
        if kind == "router":
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown peer -> error, not a silent drop
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted peer reclaims its identity
        else:
            sock.setsockopt(zmq.ROUTING_ID, name.encode())
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on live connections, never blindly
        self._sock = sock
        self._pollitems = [(sock, _POLLIN)]

    def bind(self, addr: str) -> None:
        """Listen at `addr`; a ROUTER may listen at several (the controller: its ipc path and
        a TCP endpoint for other machines), all under one gatekeeper and one connection cap."""
        if self.gatekeeper is not None and not self._bound:  # one monitor sees every address
            self.gatekeeper.watch(self.name, self._sock, self.max_connections)
        self._sock.bind(addr)
        self._bound.append(addr)

    def connect(self, addr: str, server: str | None = None) -> None:
        """Dial `addr`; with security, `server` names the process there (its public key)."""
        if self.security is not None:
            key = self.security.keys.get(server or "")
            if key is None:
                raise ValueError(f"endpoint {self.name!r}: no public key for server {server!r} "
                                 f"at {addr} (keys of {sorted(self.security.keys)})")
            self._sock.curve_serverkey = key.encode()
        self._sock.connect(addr)
        self._connected.append(addr)

    @property
    def last_endpoint(self) -> str:
        """The address last bound or connected, resolved (e.g. the port chosen for ``:*``)."""
        return self._sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _count(self, type_: str, direction: str, nbytes: int) -> None:
        row = self.by_type.get(type_)
        if row is None:
            row = self.by_type[type_] = {"tx_bytes": 0, "rx_bytes": 0, "tx_msgs": 0, "rx_msgs": 0}
        row[_BYTES_KEY[direction]] += nbytes
        row[_MSGS_KEY[direction]] += 1

    def _peer(self, to: str | None) -> str:
        return to if to is not None else ", ".join(self._connected) or "(not connected)"

    def send(self, type: str, *, to: str | None = None, round: int = 0, step: int = 0,
             tensors: dict[str, torch.Tensor] | None = None, meta: dict | None = None) -> int:
        """Send one message; return its protocol-layer size in bytes."""
        if (self.kind == "router") != (to is not None):
            need = "needs 'to'" if self.kind == "router" else "takes no 'to'"
            raise ValueError(f"endpoint {self.name!r}: a {self.kind} send {need}")
        msg = Message(type=type, run=self.run, round=round, step=step, sender=self.name,
                      seq=self._seq, tensors=tensors or {}, meta=meta or {}, epoch=self.epoch)
        frames = encode(msg)
        if msg.nbytes > self.max_message_bytes:  # the peer would drop it; fail loudly here instead
            raise ProtocolError("too_large",
                                f"message: {msg.nbytes} > {self.max_message_bytes} bytes")
        if to is not None:
            frames.insert(0, to.encode())
        if self.interrupt is not None:
            self._wait_writable()
        try:
            # What send_multipart does, minus its per-call type checks (encode built every frame)
            # and IntFlag arithmetic; libzmq still delivers the parts all or none.
            send, last = self._sock.send, len(frames) - 1
            for i, frame in enumerate(frames):
                send(frame, _SNDMORE if i < last else 0, copy=False)
        except zmq.Again:
            raise TimeoutError(f"endpoint {self.name!r}: send {type} to {self._peer(to)!r} timed "
                               f"out after {self.send_timeout_s}s (peer absent or slow)") from None
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise ConnectionError(f"endpoint {self.name!r}: unknown peer {self._peer(to)!r} "
                                      f"(not connected, or has not sent anything yet)") from None
            raise
        self._seq += 1
        self.bytes_sent += msg.nbytes
        self.msgs_sent += 1
        self.header_bytes_sent += len(frames[1 if to is not None else 0])
        self._count(type, "tx", msg.nbytes)
        return msg.nbytes

    def poll(self, timeout_s: float) -> bool:
        """True if a message is waiting (not yet validated: ``recv`` may still drop it)."""
        return self._wait(max(0, int(timeout_s * 1000)))

    def _wait(self, timeout_ms: int) -> bool:
        # zmq_poll on a prebuilt item list: Socket.poll builds a Poller per call.
        if self.interrupt is None or 0 <= timeout_ms <= _SLICE_MS:
            return bool(zmq.zmq_poll(self._pollitems, timeout_ms))
        return self._sliced(self._pollitems, timeout_ms)

    def _sliced(self, items: list, timeout_ms: int) -> bool:
        deadline = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000
        while True:
            if self.interrupt():
                raise Interrupted(f"endpoint {self.name!r}: wait interrupted (round aborted)")
            left = _SLICE_MS if deadline is None else min(
                _SLICE_MS, math.ceil((deadline - time.monotonic()) * 1000))
            if zmq.zmq_poll(items, max(left, 0)):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def _wait_writable(self) -> None:
        # A DEALER whose peer is gone blocks in send for send_timeout_s; wait for room in
        # slices instead, so an abort gets through. A timeout falls through to send's own.
        self._sliced([(self._sock, _POLLOUT)], int(self.send_timeout_s * 1000))

    def _reject(self, reason: str, peer: str, detail: str) -> None:
        self.rejected[reason] += 1
        # First of each reason at WARNING, the rest at DEBUG: a flood of garbage cannot flood logs.
        level = logging.WARNING if self.rejected[reason] == 1 else logging.DEBUG
        log.log(level, "endpoint %r dropped message from %r (%s): %s",
                self.name, peer, reason, detail)

    def drop(self, peer: str, msg: Message, detail: str) -> None:
        """Drop a valid message its receiver did not expect at this moment (wrong type, round,
        step or sender): counted as `unexpected_message`, never fatal."""
        self._reject("unexpected_message", peer, f"{msg.type} round {msg.round} step "
                     f"{msg.step}: {detail}")

    def _accept(self, frames: list[zmq.Frame]) -> tuple[str, Message] | None:
        peer = "?"
        try:
            if self.kind == "router":
                identity, frames = frames[0].bytes, frames[1:]
                peer = identity.decode("utf-8", "replace")
            msg = decode(frames, max_message_bytes=self.max_message_bytes)
        except ProtocolError as exc:
            return self._reject(exc.reason, peer, str(exc))
        except Exception as exc:  # a decoder bug must not take the node down
            return self._reject("undecodable", peer, repr(exc))
        if self.kind == "router" and identity != msg.sender.encode():
            return self._reject("sender_mismatch", peer, f"header sender {msg.sender!r}")
        if self.kind == "router" and self.security is not None:
            try:  # the ZAP User-Id: the name of the key the peer proved it holds
                owner = frames[0].get("User-Id")
            except (zmq.ZMQError, AttributeError):
                owner = ""
            if not self.security.may_claim(owner, peer):
                return self._reject("identity_not_owned", peer, f"key of {owner!r}")
        if self.expected is not None and self.kind == "router" and peer not in self.expected:
            return self._reject("unexpected_sender", peer, f"{msg.type}; expected one of "
                                f"{sorted(self.expected)}")
        if self.run and msg.run != self.run:
            return self._reject("wrong_run", peer, f"run {msg.run!r}, expected {self.run!r}")
        if msg.epoch < self.epoch:
            return self._reject("stale_epoch", peer, f"{msg.type} round {msg.round} step "
                                f"{msg.step} of epoch {msg.epoch} < {self.epoch}")
        self.bytes_recv += msg.nbytes
        self.msgs_recv += 1
        self.header_bytes_recv += len(frames[0])
        self._count(msg.type, "rx", msg.nbytes)
        return msg.sender, msg

    def recv(self, timeout_s: float | None) -> tuple[str, Message]:
        """Wait up to ``timeout_s`` (None: forever) for a valid message; return (peer, message).

        Invalid messages are dropped and counted in ``rejected``; the wait goes on.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            wait_ms = -1 if deadline is None else max(0, math.ceil(
                (deadline - time.monotonic()) * 1000))
            if not self._wait(wait_ms):
                raise TimeoutError(f"endpoint {self.name!r}: no valid message within {timeout_s}s")
            recv = self._sock.recv
            try:
                frames = [recv(_NOBLOCK, copy=False)]
            except zmq.Again:
                continue
            while frames[-1].more:  # a multipart message arrives whole: the rest is already here
                frames.append(recv(_NOBLOCK, copy=False))
            got = self._accept(frames)
            if got is not None:
                return got

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable snapshot of the counters."""
        return {
            "name": self.name, "kind": self.kind, "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv, "msgs_sent": self.msgs_sent,
            "msgs_recv": self.msgs_recv, "header_bytes_sent": self.header_bytes_sent,
            "header_bytes_recv": self.header_bytes_recv,
            "by_type": {k: dict(v) for k, v in self.by_type.items()},
            "rejected": self.rejections(),
        }

    def rejections(self) -> dict[str, int]:
        """Every message and connection this endpoint refused, by reason (the gatekeeper's
        handshake refusals for a ROUTER included)."""
        out = collections.Counter(self.rejected)
        if self.gatekeeper is not None and self.kind == "router":
            out.update(self.gatekeeper.counts(self.name))
        return dict(out)

    def expect_from(self, *identities: str) -> None:
        """Let these identities send here too (a peer that joins later: migration, rejoin)."""
        if self.expected is not None:
            self.expected.update(identities)

    def close(self) -> None:
        self._sock.close()  # uses the socket's LINGER, so queued sends still go out

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Plane:
    """Makes every Endpoint of one process alike: the run, its security, its bounds.

    One per process and zmq.Context (a node, the controller); the gatekeeper starts with the
    first ROUTER. ``close()`` after every endpoint is closed, before the context is terminated.
    """

    zctx: zmq.Context
    run: str = ""
    security: Security | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_connections: int = 1 << 16
    gatekeeper: Gatekeeper | None = None

    def router(self, name: str, addr: str, expected: set[str] | None = None,
               **kw: Any) -> Endpoint:
        if self.gatekeeper is None:
            self.gatekeeper = Gatekeeper(self.zctx, self.security)
        ep = Endpoint(self.zctx, "router", name, run=self.run, security=self.security,
                      gatekeeper=self.gatekeeper, max_connections=self.max_connections,
                      max_message_bytes=self.max_message_bytes, expected=expected, **kw)
        ep.bind(addr)
        return ep

    def dealer(self, identity: str, addr: str, server: str, **kw: Any) -> Endpoint:
        ep = Endpoint(self.zctx, "dealer", identity, run=self.run, security=self.security,
                      max_message_bytes=self.max_message_bytes, **kw)
        ep.connect(addr, server)
        return ep

    @classmethod
    def from_config(cls, zctx: zmq.Context, config: dict[str, Any]) -> Plane:
        """A node's plane from its config: `run`, `security` (absent: insecure) and the
        receive budget `max_message_bytes`, `max_connections`."""
        plane = cls(zctx, config["run"], Security.from_dict(config.get("security")))
        if config.get("max_message_bytes"):
            plane.max_message_bytes = int(config["max_message_bytes"])
        if config.get("max_connections"):
            plane.max_connections = int(config["max_connections"])
        return plane

    def close(self) -> None:
        if self.gatekeeper is not None:
            self.gatekeeper.stop()
            self.gatekeeper = None
