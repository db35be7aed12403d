"""The wire protocol: framing round-trips, hostile input is rejected, every byte is counted."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zmq

from nodes.protocol import (
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    Endpoint,
    Message,
    ProtocolError,
    decode,
    encode,
)

MIB = 1024 * 1024


# ---------------------------------------------------------------- encode / decode in memory


def test_round_trip_keeps_dtypes_shapes_values_and_meta() -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 4, generator=g),
        "f64": torch.randn(5, generator=g, dtype=torch.float64),
        "f16": torch.randn(2, 2, generator=g).half(),
        "bf16": torch.randn(7, 3, generator=g).bfloat16(),
        "i64": torch.arange(10),
        "i32": torch.arange(-4, 4, dtype=torch.int32).reshape(2, 2, 2),
        "i16": torch.tensor([-32768, 32767], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.tensor([0, 255], dtype=torch.uint8),
        "mask": torch.tensor([[True, False, True]]),
        "empty": torch.zeros(0, 5),
        "empty_bf16": torch.zeros(4, 0, dtype=torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "transposed": torch.randn(4, 6, generator=g).t(),  # non-contiguous: sent as contiguous
        "grad": torch.randn(3, generator=g, requires_grad=True),
    }
    meta = {"codec": "topk", "k": 12, "scale": 0.5, "ok": True, "none": None,
            "nested": {"idx": [[1, 2], [3]], "name": "c3"}}
    msg = Message("ACT", run="r1", round=3, step=17, sender="client-1", seq=42,
                  tensors=tensors, meta=meta)
    frames = encode(msg)
    out = decode(frames)
    assert (out.type, out.run, out.round, out.step, out.sender, out.seq) == (
        "ACT", "r1", 3, 17, "client-1", 42)
    assert out.meta == meta
    assert list(out.tensors) == list(tensors)  # insertion order survives
    for name, t in tensors.items():
        got = out.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t.detach()), name
    header_len = len(frames[0])
    payload = sum(t.nbytes for t in tensors.values())
    assert msg.nbytes == out.nbytes == header_len + payload


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.bool, torch.int64])
def test_tensors_are_not_copied_on_encode_or_decode(dtype: torch.dtype) -> None:
    t = torch.ones(64, 32, 4, dtype=dtype)
    frames = encode(Message("ACT", tensors={"x": t}))
    assert np.asarray(frames[1]).ctypes.data == t.data_ptr()  # the frame is a view of t
    assert memoryview(frames[1]).format == "B" and memoryview(frames[1]).ndim == 1  # flat bytes
    got = decode(frames).tensors["x"]
    assert got.data_ptr() == t.data_ptr() and got.dtype == dtype and torch.equal(got, t)


def test_received_tensor_aliases_the_zmq_frame_buffer() -> None:
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = rx.bind_to_random_port("tcp://127.0.0.1")
        tx.connect(f"tcp://127.0.0.1:{port}")
        t = torch.randn(MIB // 4)
        tx.send_multipart(encode(Message("ACT", sender="c", tensors={"x": t})), copy=False)
        assert rx.poll(5000)
        frames = rx.recv_multipart(copy=False)
        got = decode(frames[1:]).tensors["x"]
        frame_addr = np.frombuffer(frames[2].buffer, dtype=np.uint8).ctypes.data
        assert got.data_ptr() == frame_addr  # same memory, no copy into a fresh tensor
        assert got.is_contiguous() and torch.equal(got, t)
    finally:
        rx.close(linger=0), tx.close(linger=0)
        ctx.term()


def _header(**changes: Any) -> dict[str, Any]:
    hdr = {"v": PROTOCOL_VERSION, "type": "ACT", "run": "", "round": 0, "step": 0,
           "sender": "c", "seq": 0, "tensors": [["x", "float32", [2, 3], 24]], "meta": {}}
    hdr.update(changes)
    return hdr


def _frames(hdr: dict[str, Any], *payloads: bytes) -> list[bytes]:
    return [msgpack.packb(hdr), *(payloads or (bytes(24),))]


def _without(key: str) -> dict[str, Any]:
    hdr = _header()
    del hdr[key]
    return hdr


MALFORMED = {
    "missing_key": (_frames(_without("seq")), "bad_header", "'seq'"),
    "extra_key": (_frames(_header(extra=1)), "bad_header", "'extra'"),
    "type_not_str": (_frames(_header(type=3)), "bad_field", "'type'"),
    "unknown_type": (_frames(_header(type="NOPE")), "unknown_type", "'type'"),
    "run_not_str": (_frames(_header(run=5)), "bad_field", "'run'"),
    "round_str": (_frames(_header(round="1")), "bad_field", "'round'"),
    "round_negative": (_frames(_header(round=-1)), "bad_field", "'round'"),
    "step_float": (_frames(_header(step=1.5)), "bad_field", "'step'"),
    "seq_bool": (_frames(_header(seq=True)), "bad_field", "'seq'"),
    "seq_too_big": (_frames(_header(seq=2**63)), "bad_field", "'seq'"),
    "sender_none": (_frames(_header(sender=None)), "bad_field", "'sender'"),
    "sender_too_long": (_frames(_header(sender="s" * 129)), "bad_field", "'sender'"),
    "tensors_not_list": (_frames(_header(tensors={})), "bad_field", "'tensors'"),
    "tensor_entry_short": (_frames(_header(tensors=[["x", "float32", [2, 3]]])),
                           "bad_field", "'tensors[0]'"),
    "tensor_name_empty": (_frames(_header(tensors=[["", "float32", [2, 3], 24]])),
                          "bad_field", "'tensors[0].name'"),
    "tensor_name_duplicate": (_frames(_header(tensors=[["x", "uint8", [1], 1]] * 2), b"a", b"b"),
                              "bad_field", "'tensors[1].name'"),
    "bad_dtype": (_frames(_header(tensors=[["x", "complex64", [2, 3], 48]])),
                  "bad_dtype", "'tensors[0].dtype'"),
    "shape_negative": (_frames(_header(tensors=[["x", "float32", [-2, 3], 24]])),
                       "bad_shape", "'tensors[0].shape'"),
    "shape_too_many_dims": (_frames(_header(tensors=[["x", "float32", [1] * 9, 4]]), bytes(4)),
                            "bad_shape", "'tensors[0].shape'"),
    "nbytes_mismatch": (_frames(_header(tensors=[["x", "float32", [2, 3], 20]]), bytes(20)),
                        "bad_shape", "'tensors[0].nbytes'"),
    "meta_not_map": (_frames(_header(meta=[1])), "bad_field", "'meta'"),
    "meta_too_deep": (_frames(_header(meta={"a": [[[[1]]]]})), "bad_field", "'meta.a[0][0][0]'"),
    "meta_too_many_keys": (_frames(_header(meta={str(i): i for i in range(257)})),
                           "bad_header", "frame 0"),
    "too_few_frames": (_frames(_header()) + [b"extra"], "frame_count", "expected 2 frames"),
    "no_frames": ([], "frame_count", "frames"),
    "frame_length": (_frames(_header(), bytes(23)), "frame_size", "frame 1 (tensor 'x')"),
    "garbage": ([b"\xc1\xc1 not msgpack", bytes(24)], "bad_header", "frame 0"),
    "header_not_map": ([msgpack.packb([1, 2, 3])], "bad_header", "frame 0"),
    "header_too_big": ([b"\x00" * (MAX_HEADER_BYTES + 1)], "too_large", "frame 0"),
    "wrong_version": (_frames(_header(v=PROTOCOL_VERSION + 1)), "version", "'v'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_input_is_rejected_naming_field_or_frame(case: str) -> None:
    frames, reason, where = MALFORMED[case]
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.reason == reason
    assert where in str(info.value)


def test_message_above_size_limit_is_rejected() -> None:
    frames = encode(Message("ACT", tensors={"x": torch.zeros(1024)}))
    with pytest.raises(ProtocolError, match="message") as info:
        decode(frames, max_message_bytes=4096)
    assert info.value.reason == "too_large"


def test_invalid_message_never_leaves_the_sender() -> None:
    for msg, reason in [(Message("NOPE"), "unknown_type"), (Message("CTRL", round=-1), "bad_field"),
                        (Message("CTRL", meta={"x": object()}), "bad_field"),
                        (Message("ACT", tensors={"c": torch.zeros(2, dtype=torch.complex64)}),
                         "bad_dtype")]:
        with pytest.raises(ProtocolError) as info:
            encode(msg)
        assert info.value.reason == reason


# ---------------------------------------------------------------- endpoints over real sockets


class Net:
    """Endpoints and raw sockets on one context, all closed explicitly at teardown."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.opened: list[Endpoint | zmq.Socket] = []

    def endpoint(self, kind: str, name: str, **kw: Any) -> Endpoint:
        kw.setdefault("send_timeout_s", 2.0)
        ep = Endpoint(self.ctx, kind, name, **kw)
        self.opened.append(ep)
        return ep

    def pair(self, addr: str = "tcp://127.0.0.1:*", run: str = "") -> tuple[Endpoint, Endpoint]:
        server = self.endpoint("router", "server", run=run)
        server.bind(addr)
        client = self.endpoint("dealer", "client-1", run=run)
        client.connect(server.last_endpoint)
        client.send("HELLO")  # the router can address a dealer only after hearing from it
        peer, msg = server.recv(5.0)
        assert (peer, msg.type) == ("client-1", "HELLO")
        return server, client

    def raw_dealer(self, server: Endpoint, identity: bytes) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        self.opened.append(sock)
        sock.setsockopt(zmq.ROUTING_ID, identity)
        sock.connect(server.last_endpoint)
        return sock

    def close(self) -> None:
        for obj in self.opened:
            obj.close()  # endpoints linger so queued sends finish; raw sockets have nothing queued
        self.ctx.term()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


def test_small_tensors_at_odd_offsets_arrive_aligned_and_intact(net: Net) -> None:
    server, client = net.pair()
    tensors = {"u8": torch.arange(3, dtype=torch.uint8), "f64": torch.randn(5, dtype=torch.float64),
               "bf16": torch.randn(3).bfloat16(), "i32": torch.arange(7, dtype=torch.int32),
               "f32": torch.randn(2, 3)}
    client.send("ACT", tensors=tensors)
    got = server.recv(5.0)[1].tensors
    for name, t in tensors.items():
        assert got[name].data_ptr() % t.element_size() == 0, name
        assert torch.equal(got[name], t), name


def test_garbage_is_dropped_counted_and_next_message_still_arrives(
        net: Net, caplog: pytest.LogCaptureFixture) -> None:
    server, client = net.pair()
    raw = net.raw_dealer(server, b"mallory")
    raw.send_multipart([b"\xc1 garbage", b"more garbage"])
    raw.send_multipart(encode(Message("CTRL", sender="mallory", meta={"n": 1})), copy=False)
    peer, msg = server.recv(5.0)
    assert (peer, msg.type, msg.meta) == ("mallory", "CTRL", {"n": 1})
    assert server.rejected == {"bad_header": 1}
    client.send("REPORT", meta={"loss": 0.5})
    assert server.recv(5.0)[1].meta == {"loss": 0.5}
    assert server.msgs_recv == 3 and server.stats()["rejected"] == {"bad_header": 1}
    assert [r.levelname for r in caplog.records if "bad_header" in r.getMessage()] == ["WARNING"]


def test_spoofed_sender_identity_is_rejected(net: Net) -> None:
    server, _ = net.pair()
    raw = net.raw_dealer(server, b"mallory")
    raw.send_multipart(encode(Message("GRAD", sender="client-1")), copy=False)
    raw.send_multipart(encode(Message("CTRL", sender="mallory")), copy=False)
    peer, msg = server.recv(5.0)
    assert (peer, msg.type) == ("mallory", "CTRL")
    assert server.rejected == {"sender_mismatch": 1}


def test_message_from_another_run_is_rejected(net: Net) -> None:
    server, _ = net.pair(run="run-a")
    raw = net.raw_dealer(server, b"old")
    raw.send_multipart(encode(Message("ACT", run="run-b", sender="old")), copy=False)
    raw.send_multipart(encode(Message("ACT", run="run-a", sender="old")), copy=False)
    assert server.recv(5.0)[1].run == "run-a"
    assert server.rejected == {"wrong_run": 1}


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_4mib_exchange_both_ways_counts_bytes_exactly(
        net: Net, tmp_path: Any, transport: str) -> None:
    addr = "tcp://127.0.0.1:*" if transport == "tcp" else f"ipc://{tmp_path}/s.ipc"
    server, client = net.pair(addr)
    act, grad = torch.randn(1024, 1024), torch.randn(1024, 1024)  # 4 MiB each
    sent_up = client.send("ACT", round=1, step=2, tensors={"x": act}, meta={"batch": 1024})
    peer, up = server.recv(5.0)
    assert peer == "client-1" and torch.equal(up.tensors["x"], act) and up.round == 1
    sent_down = server.send("GRAD", to=peer, round=1, step=2, tensors={"g": grad})
    _, down = client.recv(5.0)
    assert down.sender == "server" and torch.equal(down.tensors["g"], grad)
    assert sent_up > 4 * MIB and sent_down > 4 * MIB
    assert client.bytes_sent == server.bytes_recv and server.bytes_sent == client.bytes_recv
    assert server.by_type["ACT"]["rx_bytes"] == client.by_type["ACT"]["tx_bytes"] == sent_up
    assert client.by_type["GRAD"]["rx_bytes"] == server.by_type["GRAD"]["tx_bytes"] == sent_down
    assert server.header_bytes_recv == client.header_bytes_sent
    assert client.header_bytes_recv == server.header_bytes_sent
    assert server.stats()["msgs_recv"] == 2 and client.stats()["msgs_recv"] == 1
    json.dumps(server.stats()), json.dumps(client.stats())


def test_bytes_counted_equal_tensor_bytes_plus_header_bytes(net: Net) -> None:
    server, client = net.pair()
    base_sent, base_hdr = client.bytes_sent, client.header_bytes_sent
    payloads = [{}, {"x": torch.randn(100)}, {"a": torch.ones(3, 3, dtype=torch.bfloat16),
                                              "b": torch.zeros(0)},
                {"y": torch.arange(5000), "m": torch.ones(7, dtype=torch.bool)}]
    returned = [client.send("ACT", step=i, tensors=p) for i, p in enumerate(payloads)]
    for i in range(len(payloads)):
        msg = server.recv(5.0)[1]
        assert (msg.step, msg.seq) == (i, i + 1)  # seq 0 was the HELLO
    tensor_bytes = sum(t.nbytes for p in payloads for t in p.values())
    header_bytes = client.header_bytes_sent - base_hdr
    assert client.bytes_sent - base_sent == sum(returned) == tensor_bytes + header_bytes
    assert server.bytes_recv == client.bytes_sent
    assert server.header_bytes_recv == client.header_bytes_sent
    assert server.msgs_recv == client.msgs_sent == 1 + len(payloads)


def test_endpoint_refuses_to_send_what_its_peer_would_drop(net: Net) -> None:
    small = net.endpoint("dealer", "small", max_message_bytes=1000)
    with pytest.raises(ProtocolError, match="message") as info:
        small.send("ACT", tensors={"x": torch.zeros(1000)})
    assert info.value.reason == "too_large" and small.msgs_sent == 0


def test_recv_timeout_raises_naming_the_endpoint(net: Net) -> None:
    server, _ = net.pair()
    assert not server.poll(0.05)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="server"):
        server.recv(0.2)
    assert time.monotonic() - start >= 0.19


def test_router_send_to_unknown_peer_raises_naming_it(net: Net) -> None:
    server, _ = net.pair()
    with pytest.raises(ConnectionError, match="ghost"):
        server.send("CTRL", to="ghost")
    assert server.msgs_sent == 0


def test_dealer_send_without_a_peer_times_out(net: Net) -> None:
    lonely = net.endpoint("dealer", "lonely", send_timeout_s=0.2)
    lonely.connect("tcp://127.0.0.1:9")  # nothing listens there
    with pytest.raises(TimeoutError, match="lonely.*tcp://127.0.0.1:9"):
        lonely.send("HELLO")
    with pytest.raises(ValueError, match="no 'to'"):
        lonely.send("HELLO", to="server")


def test_close_right_after_large_send_still_delivers(net: Net) -> None:
    server, client = net.pair()
    big = torch.randn(4 * MIB)  # 16 MiB
    client.send("W_UP", tensors={"w": big})
    client.close()
    _, msg = server.recv(10.0)
    assert msg.type == "W_UP" and torch.equal(msg.tensors["w"], big)


def test_message_with_the_most_tensors_allowed_arrives_whole(net: Net) -> None:
    server, client = net.pair()
    tensors = {f"t{i}": torch.full((i % 7,), float(i)) for i in range(MAX_TENSORS)}
    client.send("W_UP", tensors=tensors)
    got = server.recv(5.0)[1].tensors
    assert list(got) == list(tensors)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


def _python(code: str, *args: str) -> str:
    """Run code in a fresh interpreter (process-wide settings stay out of this one)."""
    out = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code, *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_read_only_received_tensors_warn_nothing_even_when_warnings_are_errors() -> None:
    _python("""
import torch, zmq
from nodes.protocol import Message, decode, encode
frames = [zmq.Frame(bytes(f)) for f in encode(Message("ACT", tensors={"x": torch.ones(8)}))]
for _ in range(2):
    assert torch.equal(decode(frames).tensors["x"], torch.ones(8))
""")


FAULTS_PER_PAGE = """
import resource, sys
import torch, zmq
from nodes import protocol as P
if sys.argv[1] == "reuse":
    assert P.reuse_receive_memory()
ctx = zmq.Context()
server = P.Endpoint(ctx, "router", "server")
server.bind("tcp://127.0.0.1:*")
client = P.Endpoint(ctx, "dealer", "client")
client.connect(server.last_endpoint)
x = torch.ones(12 * 1024 * 1024)  # 48 MiB: above glibc's largest adaptive mmap threshold
def one():
    client.send("ACT", tensors={"x": x})
    assert torch.equal(server.recv(30)[1].tensors["x"], x)
one(), one()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    one()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4 / (x.nbytes / 4096))
client.close(), server.close()
ctx.term()
"""


# A node as the zygote launcher makes it: forked from a warmed-up process, then its config's
# transport settings (nodes.runtime.prepare_transport) before its first zmq.Context.
FORKED_NODE_FAULTS = """
import json, os, sys
from testbed.run.zygote import warm_up
warm_up()
r, w = os.pipe()
if os.fork() == 0:
    from nodes.runtime import prepare_transport
    prepare_transport(json.loads(sys.argv[1]))
    sys.argv[1] = "node"
    os.dup2(w, 1)
    exec(FAULTS)
    sys.stdout.flush()
    os._exit(0)
os.close(w)
print(os.read(r, 100).decode().strip())
os.wait()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_zygote_forked_node_reuses_receive_memory_by_default_and_not_when_opted_out() -> None:
    code = f"FAULTS = {FAULTS_PER_PAGE!r}\n{FORKED_NODE_FAULTS}"
    by_default = float(_python(code, "{}").split()[-1])
    opted_out = float(_python(code, json.dumps({"transport": {"reuse_receive_memory": False}}))
                      .split()[-1])
    assert by_default < 0.05 and opted_out > 0.5


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_receive_memory_stops_fresh_pages_for_every_large_message() -> None:
    default, reused = (float(_python(FAULTS_PER_PAGE, mode)) for mode in ("default", "reuse"))
    assert default > 0.5  # by default each 48 MiB frame lands in freshly faulted pages ...
    assert reused < 0.05  # ... after the opt-in, in memory freed by the previous one
