"""Migration logic without a network: the STATE layout, its hash, loading, and the policy."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nodes.context import NodeContext
from nodes.migrate import MigrationError, pack_context, state_hash, unpack_into
from nodes.models import build_model, split_model
from nodes.protocol import Message, decode, encode
from testbed.emu.topology import load_topology
from testbed.scenario import migration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_ctx(name: str, seed: int, steps: int = 0) -> NodeContext:
    """A server holding smallcnn's segment 1 (SGD, momentum), after `steps` training steps."""
    model = build_model("smallcnn", in_channels=1, image_size=8, num_classes=10, seed=seed)
    seg = split_model(model, ["conv2"])[1]
    opt = torch.optim.SGD(seg.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(seg(torch.randn(8, 64, 2, 2, generator=g)),
                        torch.randint(0, 10, (8,), generator=g)).backward()
        opt.step()
    return NodeContext(name=name, role="server", run="r", segments={1: seg},
                       optimizers={1: opt}, roles={"server": [name]})


def over_the_wire(ctx: NodeContext) -> Message:
    tensors, meta = pack_context(ctx)
    return decode(encode(Message("STATE", tensors=tensors, meta=meta)))


def test_state_survives_the_wire_and_loads_with_the_same_hash():
    old, new = server_ctx("e1", seed=1, steps=3), server_ctx("e2", seed=2)
    assert state_hash(*pack_context(old)) != state_hash(*pack_context(new))
    msg = over_the_wire(old)
    assert {n.split("/")[0] for n in msg.tensors} == {"w", "o"}  # weights and momentum
    unpack_into(new, msg.tensors, msg.meta)
    assert state_hash(*pack_context(new)) == state_hash(*pack_context(old))
    # The loaded optimizer goes on exactly as the old one would have.
    x, y = torch.randn(8, 64, 2, 2), torch.randint(0, 10, (8,))
    for ctx in (old, new):
        ctx.optimizers[1].zero_grad()
        F.cross_entropy(ctx.segments[1](x), y).backward()
        ctx.optimizers[1].step()
    assert state_hash(*pack_context(new)) == state_hash(*pack_context(old))


def test_state_for_other_segments_or_shapes_is_refused_by_name():
    msg = over_the_wire(server_ctx("e1", seed=1, steps=1))
    other = server_ctx("e2", seed=2)
    with pytest.raises(MigrationError, match=r"meta.segments \[2\]"):
        unpack_into(other, msg.tensors, {**msg.meta, "segments": [2]})
    bad = {**msg.tensors, "w/1/fc2.weight": torch.zeros(3, 3)}
    with pytest.raises(MigrationError, match="weights of segment 1"):
        unpack_into(other, bad, msg.meta)
    with pytest.raises(MigrationError, match="'x/1/a'"):
        unpack_into(other, {**msg.tensors, "x/1/a": torch.zeros(1)}, msg.meta)


def test_per_cell_topology_and_serving_policy():
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "cellular.py"),
                            params={"cells": 3, "ues": 2, "edges": "per-cell", "serving": 2})
    roles = {h: topo.nodeInfo(h)["role"] for h in topo.hosts()}
    assert {h: r for h, r in roles.items() if h.startswith("e")} == {
        "e1": "standby", "e2": "server", "e3": "standby"}
    assert "srv" not in roles
    exp = SimpleNamespace(topo=topo, attachment={},
                          roles={"client": [h for h, r in roles.items() if r == "client"],
                                 "server": ["e2"]})
    assert migration.serving_edge(exp, follow="ue1") == "e1"   # ue1, ue2 are in cell 1
    assert migration.serving_edge(exp) == "e2"                 # a tie keeps the server
    exp.attachment["ue3"] = 1                                  # cell 1 now has 3 of 6
    assert migration.serving_edge(exp) == "e1"
    with pytest.raises(migration.MigrationFailed, match="follow='e1'"):
        migration.serving_edge(exp, follow="e1")
    with pytest.raises(ValueError, match="edges='x'"):
        load_topology(os.path.join(ROOT, "topologies", "cellular.py"), params={"edges": "x"})


def test_segments_with_dotted_unit_names_and_buffers_load():
    """resnet18's units are named like "layer1.0", which load_state_dict cannot load; its
    BatchNorm buffers (running stats, num_batches_tracked) move with the weights."""
    def ctx(seed: int) -> NodeContext:
        model = build_model("resnet18", in_channels=1, image_size=8, num_classes=10, seed=seed)
        seg = split_model(model, ["layer4.0"])[1]
        seg(torch.randn(4, 512, 1, 1))  # train mode: running stats move
        opt = torch.optim.SGD(seg.parameters(), lr=0.05, momentum=0.9)
        return NodeContext(name="e", role="server", run="r", segments={1: seg},
                           optimizers={1: opt}, roles={})

    old, new = ctx(1), ctx(2)
    msg = over_the_wire(old)
    assert any(n.endswith("running_mean") for n in msg.tensors)
    unpack_into(new, msg.tensors, msg.meta)
    assert state_hash(*pack_context(new)) == state_hash(*pack_context(old))


def test_mid_round_handover_migrates_at_the_next_boundary(tmp_path):
    """A handover during round 2 (timer thread) moves the attachment at once; the migration
    waits for the boundary before round 3 and moves what e1 held after round 2."""
    from nodes.migrate import checkpoint_hash
    from testbed import Experiment
    from testbed.plan.config import RunConfig
    from testbed.run.records import read_rounds
    from testbed.scenario.timeline import Handover, Scenario

    topo, _ = load_topology(os.path.join(ROOT, "topologies", "cellular.py"),
                            params={"cells": 2, "ues": 1, "edges": "per-cell"})
    cfg = RunConfig.from_dict(dict(name="mig", dataset="digits", rounds=3, iters_per_round=20,
                                   batch_size=32, momentum=0.9, port=18100, evaluate=False,
                                   out_dir=str(tmp_path)))
    drive = Scenario([Handover(during_round=2, at=0.01, user="ue1", cell=2)], follow="ue1")
    exp = Experiment(cfg, topo, topology="cellular", scenario=drive, loopback=True)
    exp.run()
    rounds = read_rounds(exp.run_dir.path)
    (react,) = [e for r in rounds for e in r.get("events", []) if e["kind"] == "reaction"]
    (mig,) = [e for r in rounds for e in r.get("events", []) if e["kind"] == "migration"]
    assert (react["target"], react["migration"]) == ("e2", "at the next round boundary")
    assert (mig["from"], mig["to"], mig["before_round"]) == ("e1", "e2", 3)
    assert [sorted(r["nodes"]) for r in rounds] == [["e1", "ue1", "ue2"]] * 2 + [
        ["e2", "ue1", "ue2"]]
    assert checkpoint_hash(exp.run_dir.file("ckpt", "e1.pt")) == mig["hash"]
    assert exp.attachment["ue1"] == 2 and exp.roles["server"] == ["e2"]
