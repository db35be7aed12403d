"""Chains of relays (N-segment runs): which relays carry each client's traffic, which tier holds
which model segments, and what a segment costs in memory.

A chain is client -> relay tier(s) -> server, the tiers named by role (RunConfig.tiers, client
side first). Each client's relays are chosen hop by hop: at each tier the host of that role
nearest (fewest links) to the previous hop. Segments go where the scheme places them
(`Scheme.chain_placement`) unless a host of the chain declares a memory limit (mem_mb): then the
controller's placement (testbed.emu.routing.place_segments) decides which tier holds which
segments, over the tiers in path order, each tier limited by its tightest host, a segment
costing its training memory on that tier (`segment_memory`); the scheme then adds the copies it
keeps for the clients (SL's store, SFL's fed server). U-shaped, the clients keep the first and
last segments and the middle ones are placed over the relay tiers and the server.
docs/multitier.md.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import networkx as nx

from nodes.models import build_model, split_model, unit_stats
from nodes.schemes.base import Roles, Scheme
from testbed.emu.routing import place_segments
from testbed.emu.topolib import Topo

FLOAT_BYTES = 4


def relays_of(topo: Topo, roles: Roles, tiers: list[str]) -> dict[str, list[str]]:
    """client -> its relays, client side first (ties to the first name)."""
    g = nx.Graph(list(topo.links()))
    out = {}
    for c in roles["client"]:
        prev, hops = c, []
        for tier in tiers:
            dist = nx.single_source_shortest_path_length(g, prev)
            prev = min(roles[tier], key=lambda h, d=dist: (d.get(h, math.inf), h))
            hops.append(prev)
        out[c] = hops
    return out


def segment_bytes(model_kwargs: dict[str, Any], cuts: list[str]) -> list[float]:
    """Bytes of each segment's parameters (float32)."""
    return [FLOAT_BYTES * sum(p.numel() for p in s.parameters())
            for s in split_model(build_model(**model_kwargs), cuts)]


def segment_memory(model_kwargs: dict[str, Any], cuts: list[str], batch_rows: int,
                   optimizer_slots: int = 0) -> list[float]:
    """Bytes each segment needs to train on `batch_rows` samples at once (float32): its
    parameters, their gradients and `optimizer_slots` optimizer buffers per parameter (SGD
    with momentum: 1, Adam: 2), plus the activations a backward needs: the segment's input
    and each unit's output, for every row. A lower bound: autograd also keeps tensors inside
    units (e.g. before a ReLU), and the allocator rounds up."""
    return [FLOAT_BYTES * (params * (2 + optimizer_slots) + batch_rows * acts)
            for params, acts in _segment_sizes(tuple(sorted(model_kwargs.items())),
                                               tuple(cuts))]


@functools.lru_cache(maxsize=16)
def _segment_sizes(model_items: tuple, cuts: tuple[str, ...]) -> list[tuple[int, int]]:
    """(parameters, activation elements per row) of each segment."""
    kw = dict(model_items)
    model = build_model(**kw)
    size, chans = kw.get("image_size", 28), kw.get("in_channels", 1)
    stats = {u.name: u for u in unit_stats(model, (chans, size, size))}
    elems_in, out = chans * size * size, []
    for seg in split_model(model, list(cuts)):
        names = [n for n, _ in seg.named_children()]
        out.append((sum(p.numel() for p in seg.parameters()),
                    elems_in + sum(stats[n].out_elems for n in names)))
        if names:
            elems_in = stats[names[-1]].out_elems
    return out


def place_chain(scheme: Scheme, num_segments: int, roles: Roles, tiers: list[str],
                mem_mb: dict[str, int], model_kwargs: dict[str, Any], cuts: list[str],
                batch_size: int = 32, momentum: float = 0.0,
                ) -> tuple[dict[str, list[int]], dict[str, Any] | None]:
    """(host -> segments, the controller's plan or None when no host declares mem_mb).

    Rows a tier trains on at once: a client its batch; a relay or the server its clients'
    batches concatenated when the scheme concatenates them (PSL, EPSL), else one batch."""
    placement = scheme.chain_placement(num_segments, roles, tiers)  # also the scheme's checks
    path = ["client", *tiers, "server"]
    limits = {t: min(mem_mb[h] for h in roles[t] if h in mem_mb) * 2**20
              for t in path if any(h in mem_mb for h in roles[t])}
    if not limits:
        return placement, None
    concat = getattr(scheme, "concatenates", lambda: False)()
    slots = 1 if momentum else 0
    served = {t: 1 if t == "client" else max(len(roles["client"]) // len(roles[t]), 1)
              for t in path}
    costs = {t: segment_memory(model_kwargs, cuts, batch_size * (served[t] if concat else 1),
                               slots) for t in path}
    # What the controller places, in model order: one unit per segment, or when U-shaped the
    # clients' pair of segments first (first and last: fixed on the clients, who must hold the
    # first unit) then the middle ones, which the clients may not take (infinite cost).
    own = scheme.client_segments(num_segments) if scheme.opts.get("u_shaped") else []
    units = [own, *([s] for s in range(num_segments) if s not in own)] if own else [
        [s] for s in range(num_segments)]
    per = {t: [sum(c[s] for s in u) if t == "client" or not own or i else 0.0
               for i, u in enumerate(units)] for t, c in costs.items()}
    if own:
        per["client"][1:] = [math.inf] * (len(units) - 1)
    plan = place_segments(per, path, limits)
    plan["segments"] = {t: sorted(s for i in idx for s in units[i])
                        for t, idx in plan["segments"].items()}
    plan["by_segment"] = [next(t for t, segs in plan["segments"].items() if s in segs)
                          for s in range(num_segments)]
    plan["memory_model"] = {"batch_rows": {t: batch_size * (served[t] if concat else 1)
                                           for t in path}, "optimizer_slots": slots}
    by_tier = {t: plan["segments"].get(t, []) for t in path}
    return scheme.chain_placement(num_segments, roles, tiers, by_tier), plan
