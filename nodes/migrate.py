"""Node side of model migration: a server's state moves to another node, and peers follow it.

The controller (testbed.scenario.migration) drives a migration between rounds with three CTRL
commands,
each answered by a REPORT whose meta carries `cmd` and what the command measured:
- `migrate_in` (on the new node, started with the old server's config under its own name):
  wait for the old node's STATE, load it, answer STATE_ACK with the hash of what it loaded;
- `migrate_out` (on the old node): send every held segment's state_dict and every optimizer's
  state as one STATE message to the new node's address (over the emulated network), wait for
  the ACK; the hashes of both sides go to the controller;
- `repoint` (on every node): the old server's name is replaced by the new one in the roles; a
  node that dialled the old server closes that DEALER, dials the new address and says HELLO;
  the new node waits for the HELLOs of the nodes that will dial it.

Wire layout of STATE (no pickle): tensor frames named `w/<segment>/<state_dict key>` for the
weights and buffers and `o/<segment>/<param index>/<key>` for the optimizer's per-parameter
state (e.g. SGD's momentum_buffer); the header meta holds the segments, each optimizer's
param_groups (`groups`, "<segment>/<group index>" -> group) and non-tensor per-parameter state
(`scalars`). `state_hash` hashes exactly this layout, so a checkpoint file, the sender and the
receiver can be compared.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import torch
import zmq

from nodes.context import NodeContext
from nodes.dataplane import open_data_plane
from nodes.protocol import Endpoint

Tensors = dict[str, torch.Tensor]


class MigrationError(RuntimeError):
    pass


def pack(segments: dict[int, dict[str, torch.Tensor]],
         optimizers: dict[int, dict[str, Any]]) -> tuple[Tensors, dict[str, Any]]:
    """(tensors, meta) of segment state_dicts and optimizer state_dicts, keyed by segment."""
    tensors: Tensors = {}
    meta: dict[str, Any] = {"segments": sorted(int(i) for i in segments), "groups": {},
                            "scalars": {}}
    for i in sorted(segments):
        for k, v in segments[i].items():
            tensors[f"w/{i}/{k}"] = v.detach()
    for i in sorted(optimizers):
        sd = optimizers[i]
        for gi, group in enumerate(sd["param_groups"]):
            meta["groups"][f"{i}/{gi}"] = dict(group)
        for pidx, st in sorted(sd["state"].items()):
            for key, val in st.items():
                name = f"o/{i}/{pidx}/{key}"
                if isinstance(val, torch.Tensor):
                    tensors[name] = val.detach()
                elif val is not None:
                    meta["scalars"][name] = val
    return tensors, meta


def pack_context(ctx: NodeContext) -> tuple[Tensors, dict[str, Any]]:
    return pack({i: s.state_dict() for i, s in ctx.segments.items()},
                {i: o.state_dict() for i, o in ctx.optimizers.items()})


def state_hash(tensors: Tensors, meta: dict[str, Any]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes (in name order) and the meta."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def checkpoint_hash(path: str) -> str:
    """The state_hash of a node's checkpoint file (NodeContext.checkpoint)."""
    state = torch.load(path, weights_only=True)
    return state_hash(*pack(state["segments"], state["optimizers"]))


def unpack_into(ctx: NodeContext, tensors: Tensors, meta: dict[str, Any]) -> None:
    """Load a STATE message's weights and optimizer state into the segments ctx holds."""
    if sorted(meta.get("segments", [])) != sorted(ctx.segments):
        raise MigrationError(f"node {ctx.name}: STATE meta.segments {meta.get('segments')} "
                             f"!= the segments this node holds {sorted(ctx.segments)}")
    weights: dict[int, dict[str, torch.Tensor]] = {i: {} for i in ctx.segments}
    opt: dict[int, dict[str, Any]] = {i: {"state": {}, "param_groups": []}
                                      for i in ctx.optimizers}
    for name, t in tensors.items():
        kind, seg, rest = name.split("/", 2)
        if kind == "w" and int(seg) in weights:
            weights[int(seg)][rest] = t.clone()  # received frames are read-only
        elif kind == "o" and int(seg) in opt:
            pidx, key = rest.split("/", 1)
            opt[int(seg)]["state"].setdefault(int(pidx), {})[key] = t.clone()
        else:
            raise MigrationError(f"node {ctx.name}: STATE tensor {name!r}: unknown kind or "
                                 f"segment")
    for name, v in meta.get("scalars", {}).items():
        _, seg, pidx, key = name.split("/", 3)
        opt[int(seg)]["state"].setdefault(int(pidx), {})[key] = v
    for key in sorted(meta.get("groups", {}), key=lambda k: tuple(map(int, k.split("/")))):
        seg = int(key.split("/")[0])
        if seg not in opt:
            raise MigrationError(f"node {ctx.name}: STATE meta.groups {key!r}: segment {seg} "
                                 f"has no optimizer here")
        opt[seg]["param_groups"].append(meta["groups"][key])
    for i, sd in weights.items():
        load_weights(ctx.segments[i], sd, f"node {ctx.name}: STATE weights of segment {i}")
    for i, sd in opt.items():
        ctx.optimizers[i].load_state_dict(sd)


def load_weights(seg: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """Copy `sd` into the segment's own tensors, key for key, shape and dtype checked first,
    so a bad STATE is refused by name before any tensor of the segment changes."""
    own = seg.state_dict()
    if own.keys() != sd.keys():
        raise MigrationError(f"{what}: keys differ: missing {sorted(own.keys() - sd.keys())[:5]}"
                             f", unexpected {sorted(sd.keys() - own.keys())[:5]}")
    for k, t in own.items():
        if t.shape != sd[k].shape or t.dtype != sd[k].dtype:
            raise MigrationError(f"{what}: {k!r} is {sd[k].dtype} {list(sd[k].shape)}, "
                                 f"this node's is {t.dtype} {list(t.shape)}")
    with torch.no_grad():
        for k, t in own.items():
            t.copy_(sd[k])


def migratable(ctx: NodeContext, scheme: Any) -> None:
    """Raise unless this node's whole training state is its segments and optimizers."""
    if getattr(scheme, "_copies", None) is not None:
        raise MigrationError(f"node {ctx.name}: scheme {scheme.name!r} keeps per-client server "
                             f"copies with their own optimizers; they do not migrate")
    if ctx.peers or ctx.proxies:
        raise MigrationError(f"node {ctx.name}: dials {sorted({**ctx.peers, **ctx.proxies})}; "
                             f"only a node that listens (a server) can migrate")


# -- the commands --------------------------------------------------------------------------------
def _dealer(ctx: NodeContext, like: Endpoint | None, addr: str, server: str) -> Endpoint:
    """A DEALER to node `server` at `addr` in this node's recovery epoch and abort policy
    (those of `like`)."""
    ep = ctx.plane.dealer(ctx.name, addr, server)
    ep.epoch = ctx.epoch
    ep.interrupt = like.interrupt if like is not None else None
    return ep


def migrate_out(ctx: NodeContext, scheme: Any, zctx: zmq.Context,
                meta: dict[str, Any]) -> dict[str, Any]:
    migratable(ctx, scheme)
    tensors, smeta = pack_context(ctx)
    digest = state_hash(tensors, smeta)
    timeout = float(meta.get("timeout_s", 120.0))
    t0 = time.perf_counter()
    ep = _dealer(ctx, ctx.router, meta["addr"], meta["to"])
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                nbytes = ep.send("STATE", round=int(meta.get("round", 0)), tensors=tensors,
                                 meta={**smeta, "hash": digest})
                break
            except TimeoutError:  # not connected yet; libzmq keeps trying
                if time.monotonic() > deadline:
                    raise
        _, ack = ep.recv(max(deadline - time.monotonic(), 1.0))
        if ack.type != "STATE_ACK" or ack.meta.get("hash") != digest:
            raise MigrationError(f"node {ctx.name}: expected STATE_ACK with hash {digest[:12]}, "
                                 f"got {ack.type} {ack.meta}")
        return {"hash": digest, "bytes": nbytes, "tensors": len(tensors),
                "state_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                "transfer_s": time.perf_counter() - t0}
    finally:
        ep.close()


def migrate_in(ctx: NodeContext, scheme: Any, zctx: zmq.Context,
               meta: dict[str, Any]) -> dict[str, Any]:
    ctx.router.expect_from(meta["from"])
    sender, msg = ctx.expect(ctx.router, "STATE", int(meta.get("round", 0)),
                             peer=meta["from"], decode=False)  # no cut codec on state
    smeta = {k: v for k, v in msg.meta.items() if k != "hash"}
    unpack_into(ctx, msg.tensors, smeta)
    loaded = state_hash(*pack_context(ctx))
    # On disk at once: a rollback of the coming round restores what arrived (testbed.run.recovery).
    ctx.checkpoint(int(meta.get("round", 1)) - 1)
    ctx.router.send("STATE_ACK", to=sender, round=msg.round, meta={"hash": loaded})
    return {"hash": loaded, "sent_hash": msg.meta.get("hash"), "bytes": msg.nbytes}


def repoint(ctx: NodeContext, scheme: Any, zctx: zmq.Context,
            meta: dict[str, Any]) -> dict[str, Any]:

    old, new, addr = meta["old"], meta["new"], meta["addr"]
    ctx.roles = {r: [new if h == old else h for h in hosts] for r, hosts in ctx.roles.items()}
    ctx.placement = {new if n == old else n: s for n, s in ctx.placement.items()}
    dial: dict[str, Endpoint] = {}
    if old in ctx.peers:
        gone = ctx.peers.pop(old)
        gone.close()
        ctx.peers[new] = dial[new] = _dealer(ctx, gone, addr, new)
    accept = list(meta.get("accept", [])) if ctx.name == new else []
    if accept:
        ctx.router.expect_from(*accept)
    if dial or accept:
        open_data_plane(ctx, accept, float(meta.get("timeout_s", 120.0)), hello=list(dial))
    return {"proto": ctx.proto_stats()}


COMMANDS: dict[str, Callable[[NodeContext, Any, zmq.Context, dict[str, Any]], dict[str, Any]]] = {
    "migrate_in": migrate_in, "migrate_out": migrate_out, "repoint": repoint}
