"""Model weights on the wire, and federated averaging (SFL's fed server, FL, SL's hand-off).

Segments travel as one message of named tensors: "w/<segment>/<state_dict key>" for weights
(and buffers such as BN statistics), "o/<segment>/<parameter index>/<key>" for optimizer state.
`upload_and_adopt` is a client's half of one FedAvg exchange (W_UP, then W_DOWN);
`aggregate_and_broadcast` is the aggregator's half (algorithms.md 4.1 step 3).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from nodes.context import NodeContext
from nodes.protocol import Endpoint

# Options of every scheme that federates a model (4.1): FedAvg weights by shard size (the
# formula) or uniform (the SplitFed reference code); BN statistics averaged too or kept local.
FEDAVG_OPTIONS: dict[str, Any] = {"fedavg_weights": "data", "average_bn_stats": True}
FEDAVG_CHOICES: dict[str, tuple] = {"fedavg_weights": ("data", "uniform")}


def pack(ctx: NodeContext, segs: list[int], *, buffers: bool = True,
         optimizer: bool = False) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for i in segs:
        seg = ctx.segments[i]
        params = {n for n, _ in seg.named_parameters()}
        for k, v in seg.state_dict().items():
            if buffers or k in params:
                out[f"w/{i}/{k}"] = v.detach()
        opt = ctx.optimizers.get(i)
        if optimizer and opt is not None:
            for j, p in enumerate(opt.param_groups[0]["params"]):
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        out[f"o/{i}/{j}/{k}"] = v.detach()
    return out


def unpack(ctx: NodeContext, tensors: dict[str, torch.Tensor], segs: list[int]) -> None:
    """Load weights (in place) and, if present, optimizer state into segments `segs`."""
    states = {i: ctx.segments[i].state_dict() for i in segs}
    with torch.no_grad():
        for name, t in tensors.items():
            kind, seg, key = name.split("/", 2)
            i = int(seg)
            if i not in states:
                raise ValueError(f"node {ctx.name}: weights for segment {i}, holding {segs}")
            if kind == "w":
                states[i][key].copy_(t)
            else:
                j, k = key.split("/", 1)
                p = ctx.optimizers[i].param_groups[0]["params"][int(j)]
                ctx.optimizers[i].state[p][k] = t.clone()


def reset_optimizers(ctx: NodeContext, segs: list[int]) -> None:
    """As if the optimizers were built afresh (same hyper-parameters, no state)."""
    for i in segs:
        if i in ctx.optimizers:
            ctx.optimizers[i].state.clear()


def fingerprint(ctx: NodeContext, segs: list[int]) -> str:
    """A short digest of the weights of `segs`: equal digests, bitwise-equal weights."""
    h = hashlib.sha1()
    for name, t in pack(ctx, segs).items():
        h.update(name.encode())
        # reshape: a 0-dim tensor (BN's num_batches_tracked) cannot be viewed as bytes
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of state dicts, key by key; integer entries (BN's num_batches_tracked)
    are rounded back to their dtype."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg: one weight per state, at least one state")
    keys = states[0].keys()
    if any(s.keys() != keys for s in states):
        raise ValueError("fedavg: states hold different tensors")
    total = float(sum(weights))
    out = {}
    for k in keys:
        acc = sum(s[k].double() * (w / total) for s, w in zip(states, weights, strict=True))
        like = states[0][k]
        out[k] = (acc if like.is_floating_point() else acc.round()).to(like.dtype)
    return out


def client_weights(ctx: NodeContext, weighting: str) -> dict[str, float]:
    """FedAvg weight of each client: its shard size ("data") or 1 ("uniform")."""
    return {c: float(ctx.shard_sizes[c]) if weighting == "data" else 1.0 for c in ctx.clients}


def upload_and_adopt(ctx: NodeContext, ep: Endpoint, rnd: int, segs: list[int], *,
                     buffers: bool) -> None:
    """Client side: send W_UP, then load the average that comes back as W_DOWN."""
    ep.send("W_UP", round=rnd, tensors=pack(ctx, segs, buffers=buffers))
    _, msg = ctx.expect(ep, "W_DOWN", rnd)
    with ctx.compute():
        unpack(ctx, msg.tensors, segs)


def aggregate_and_broadcast(ctx: NodeContext, rnd: int, segs: list[int], *, buffers: bool,
                            weighting: str) -> None:
    """Aggregator side: W_UP from every client, FedAvg into own `segs`, W_DOWN to every one."""
    ups: dict[str, dict[str, torch.Tensor]] = {}
    while len(ups) < len(ctx.clients):
        sender, msg = ctx.expect(ctx.router, "W_UP", rnd)
        ups[sender] = msg.tensors
    clients, w = ctx.clients, client_weights(ctx, weighting)
    with ctx.compute():
        unpack(ctx, fedavg([ups[c] for c in clients], [w[c] for c in clients]), segs)
    down = pack(ctx, segs, buffers=buffers)
    for c in clients:
        ctx.router.send("W_DOWN", to=c, round=rnd, tensors=down)
    ctx.count(aggregations=1)
