"""Chains of relays (N-segment runs): which relays carry each client's traffic, which tier holds
which model segments.

A chain is client -> relay tier(s) -> server, the tiers named by role (RunConfig.tiers, client
side first). Each client's relays are chosen hop by hop: at each tier the host of that role
nearest (fewest links) to the previous hop. Segments go where the scheme places them
(`Scheme.chain_placement`) unless a host of the chain declares a memory limit (mem_mb): then the
controller's placement (testbed.controller.place_segments) decides, over the tiers in path
order, each tier limited by its tightest host and a segment costing the bytes of its parameters.
docs/multitier.md.
"""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
from mininet.topo import Topo

from nodes.models import build_model, split_model
from nodes.schemes.base import Roles, Scheme
from testbed.controller import place_segments


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
    return [4.0 * sum(p.numel() for p in s.parameters())
            for s in split_model(build_model(**model_kwargs), cuts)]


def place_chain(scheme: Scheme, num_segments: int, roles: Roles, tiers: list[str],
                mem_mb: dict[str, int], model_kwargs: dict[str, Any],
                cuts: list[str]) -> tuple[dict[str, list[int]], dict[str, Any] | None]:
    """(host -> segments, the controller's plan or None when no host declares mem_mb)."""
    placement = scheme.chain_placement(num_segments, roles, tiers)  # also the scheme's checks
    path = ["client", *tiers, "server"]
    limits = {t: min(mem_mb[h] for h in roles[t] if h in mem_mb) * 2**20
              for t in path if any(h in mem_mb for h in roles[t])}
    if not limits:
        return placement, None
    plan = place_segments(segment_bytes(model_kwargs, cuts), path, limits)
    return {h: plan["segments"].get(t, []) for t in path for h in roles[t]}, plan
