"""Fault tolerance without a network: checkpoint atomicity and exact redo, stale-epoch dropping,
abortable waits, the heartbeat thread, liveness, the rejoin plan and resume's checks."""

from __future__ import annotations

import errno
import json
import os
import threading
import time

import msgpack
import pytest
import torch
import torch.nn.functional as F
import zmq

from nodes.context import NodeContext
from nodes.data import ArrayDataset
from nodes.fault import Heartbeat
from nodes.models import build_model, split_model
from nodes.protocol import Endpoint, Interrupted, Message, Plane, encode
from testbed.run.recovery import Liveness, rejoin_plan, resume_state


def make_ctx(tmp_path) -> NodeContext:
    segments = dict(enumerate(split_model(
        build_model("smallcnn", in_channels=1, image_size=8, num_classes=10, seed=0),
        ["conv2"])))
    opts = {i: torch.optim.SGD(s.parameters(), lr=0.05, momentum=0.9)
            for i, s in segments.items()}
    g = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randn(100, 1, 8, 8, generator=g),
                        torch.randint(0, 10, (100,), generator=g), 10, "noise")
    return NodeContext(name="n", role="client", run="r", segments=segments, optimizers=opts,
                       roles={}, data=data, batch_size=16, seed=7,
                       ckpt_path=str(tmp_path / "n.pt"))


def train_round(ctx: NodeContext, iters: int = 4) -> list[torch.Tensor]:
    """Local SGD over ctx.batches (momentum state and data order carry across rounds)."""
    seen = []
    for x, y in ctx.batches(iters):
        ctx.zero_grad()
        F.cross_entropy(ctx.model()(x), y).backward()
        ctx.step()
        seen.append(x)
    return seen


def params(ctx: NodeContext) -> list[torch.Tensor]:
    return [p.detach().clone() for p in ctx.model().parameters()]


def test_restore_redoes_a_round_bit_identically(tmp_path):
    ctx = make_ctx(tmp_path)
    train_round(ctx)
    ctx.checkpoint(1)
    batches = train_round(ctx, 5)  # crosses an epoch boundary: 4 + 5 batches of 16 > 100
    after = params(ctx)
    ctx.checkpoint(2)
    ctx.restore(1)  # back from the previous file; it becomes the current one again
    assert torch.load(ctx.ckpt_path, weights_only=True)["round"] == 1
    redo = train_round(ctx, 5)
    assert all(torch.equal(a, b) for a, b in zip(batches, redo, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(after, params(ctx), strict=True))


def test_checkpoint_write_is_atomic_and_keeps_the_previous_round(tmp_path, monkeypatch):
    ctx = make_ctx(tmp_path)
    ctx.checkpoint(1)
    train_round(ctx)
    ctx.checkpoint(2)

    def crash(obj, path):  # dies half-way through writing round 3
        if hasattr(path, "write"):  # nodes.context.save_state serialises into memory first
            path.write(b"partial")
        else:
            with open(path, "wb") as f:
                f.write(b"partial")
        raise OSError("disk gone")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        ctx.checkpoint(3)
    assert torch.load(ctx.ckpt_path, weights_only=True)["round"] == 2
    assert torch.load(f"{ctx.ckpt_path}.prev", weights_only=True)["round"] == 1
    with pytest.raises(RuntimeError, match=r"no checkpoint of round 3 .*found rounds \[2, 1\]"):
        ctx.restore(3)


def test_checkpoint_on_a_full_disk_says_so_and_names_the_file(tmp_path, monkeypatch):
    """torch's own zip writer reports a full disk as 'unexpected pos'; the node's checkpoint
    write reports OSError ENOSPC with the file, and leaves no partial file."""
    ctx = make_ctx(tmp_path)
    ctx.checkpoint(1)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device") as e:
        ctx.checkpoint(2)
    assert e.value.filename == f"{ctx.ckpt_path}.tmp"
    assert not os.path.exists(f"{ctx.ckpt_path}.tmp")
    monkeypatch.undo()
    assert torch.load(ctx.ckpt_path, weights_only=True)["round"] == 1


@pytest.fixture
def pair():
    zctx = zmq.Context()
    router = Endpoint(zctx, "router", "srv", run="r")
    router.bind("inproc://fault-test")
    dealer = Endpoint(zctx, "dealer", "c1", run="r")
    dealer.connect("inproc://fault-test")
    yield router, dealer
    router.close()
    dealer.close()
    zctx.term()


def test_messages_of_an_aborted_epoch_are_dropped(pair):
    router, dealer = pair
    dealer.send("ACT", round=2, step=3)  # sent during the aborted attempt, still queued
    router.epoch = dealer.epoch = 1      # both rolled back
    dealer.send("ACT", round=2, step=0)
    _, msg = router.recv(5)
    assert (msg.round, msg.step, msg.epoch) == (2, 0, 1)
    assert router.rejected["stale_epoch"] == 1
    # Epoch 0 adds nothing to the header: runs that never roll back keep the same bytes.
    assert "epoch" not in msgpack.unpackb(encode(Message("ACT"))[0])
    assert msgpack.unpackb(encode(Message("ACT", epoch=2))[0])["epoch"] == 2


def test_interrupt_aborts_waits_within_a_slice(pair):
    router, _ = pair
    flag = threading.Event()
    router.interrupt = flag.is_set
    threading.Timer(0.2, flag.set).start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        router.recv(30)
    assert time.monotonic() - t0 < 5  # 0.2 s + a 0.1 s slice, far below the 30 s wait
    # A DEALER whose peer is absent would block in send for send_timeout_s (30 s).
    zctx = zmq.Context()
    lonely = Endpoint(zctx, "dealer", "c2", run="r")
    lonely.connect("inproc://nobody-binds-this")
    lonely.interrupt = flag.is_set
    t0 = time.monotonic()
    with pytest.raises(Interrupted):
        lonely.send("ACT")
    assert time.monotonic() - t0 < 5
    lonely.close()
    zctx.term()


def test_heartbeat_thread_beats_on_its_own_socket_and_takes_aborts(tmp_path):
    zctx = zmq.Context()
    ctl = Endpoint(zctx, "router", "controller", run="r")
    addr = f"ipc://{tmp_path}/control"
    ctl.bind(addr)
    hb = Heartbeat(Plane(zctx, "r"), "n", addr, interval_s=0.05)
    hb.start()
    try:
        senders = [ctl.recv(5)[0] for _ in range(3)]
        assert senders == ["n#hb"] * 3
        ctl.send("CTRL", to="n#hb", meta={"cmd": "abort", "epoch": 3})
        deadline = time.monotonic() + 5
        while hb.abort_epoch != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hb.abort_epoch == 3
    finally:
        hb.stop()
        ctl.close()
        zctx.term()
    assert not hb.is_alive()


def test_liveness_names_the_silent_node_only():
    live = Liveness(interval_s=0.02, misses=3)
    live.beat("a")
    live.beat("b")
    time.sleep(0.1)
    live.beat("b")
    assert set(live.overdue()) == {"a"}


def test_rejoin_plan_two_tier_and_chain():
    srv, edge = "tcp://10.0.0.1:5555", "tcp://10.0.0.2:5556"
    two = {"srv": {"listen": srv, "peers": {}}, "c1": {"peers": {"srv": srv}},
           "c2": {"peers": {"srv": srv}}}
    assert rejoin_plan(two, ["srv"]) == {"c1": {"hello": ["srv"], "accept": []},
                                         "c2": {"hello": ["srv"], "accept": []}}
    assert rejoin_plan(two, ["c1"]) == {"srv": {"hello": [], "accept": ["c1"]}}
    # c1 -> relay e (speaking upstream as c1) -> srv
    chain = {"srv": {"listen": srv, "peers": {}}, "c1": {"peers": {"srv": edge}},
             "e": {"listen": edge, "peers": {}, "proxies": {"c1": srv}}}
    assert rejoin_plan(chain, ["e"]) == {"srv": {"hello": [], "accept": ["c1"]},
                                         "c1": {"hello": ["srv"], "accept": []}}
    assert rejoin_plan(chain, ["srv"]) == {"e": {"hello": ["c1"], "accept": []}}


def test_resume_refuses_what_it_cannot_continue(tmp_path):
    with pytest.raises(ValueError, match="not a run folder"):
        resume_state(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "nodes").mkdir()
    (tmp_path / "nodes" / "n.json").write_text(json.dumps(
        {"name": "n", "checkpoint": str(tmp_path / "n.pt")}))
    torch.save({"round": 0}, tmp_path / "n.pt")
    (tmp_path / "rounds.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    with pytest.raises(ValueError, match=r"no checkpoint of round 1 .*\{'n': \[0\]\}"):
        resume_state(tmp_path)
    torch.save({"round": 1}, tmp_path / "n.pt")
    assert resume_state(tmp_path)["from_round"] == 1
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ValueError, match="completed"):
        resume_state(tmp_path)
