"""The plan of a run: who plays which role, which node holds which segment and which data, and
who talks to whom. Pure data from the topology, the scheme and the run's config; nothing here
starts a process or touches the network (the Experiment does; it only asks the network for
addresses).

Each node gets one config dict (nodes.runtime.run_node reads it): its role, segments,
data shard, peers to dial (DEALER), address to listen on (ROUTER) and whom to accept, and,
on a chain of relays, the upstream addresses it dials as each client it serves (proxies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch

from nodes.data import dataset_info, load_dataset, partition
from nodes.models import build_model, unit_stats
from nodes.protocol import DEFAULT_MAX_MESSAGE_BYTES
from nodes.schemes.base import Scheme
from testbed.emu.topolib import Topo
from testbed.plan.chains import place_chain, relays_of
from testbed.plan.config import RunConfig


class PlanError(ValueError):
    """The topology, scheme and config do not make a run; the message names the field."""


def host_roles(topo: Topo, overrides: dict[str, str] | None = None) -> dict[str, str | None]:
    """host -> role: the topology's role= tag, or the run's override (RunConfig.roles)."""
    hosts = topo.hosts()
    unknown = sorted(set(overrides or {}) - set(hosts))
    if unknown:
        raise PlanError(f"config field 'net.roles': no host(s) {unknown} in the topology "
                        f"(hosts {sorted(hosts)})")
    return {h: (overrides or {}).get(h, topo.nodeInfo(h).get("role")) for h in hosts}


def per_host(topo: Topo, key: str, overrides: dict[str, Any],
             roles: dict[str, str | None] | None = None) -> dict[str, Any]:
    """host -> value of host parameter `key`: what the topology declares, overridden by a
    run-level entry for the host's role (`roles`, default the topology's), overridden by one
    for the host itself."""
    hosts = {h: topo.nodeInfo(h) for h in topo.hosts()}
    roles = roles or host_roles(topo)
    unknown = sorted(set(overrides) - set(hosts) - set(roles.values()))
    if unknown:
        raise PlanError(f"config field {key!r}: {unknown} is neither a host nor a role of the "
                        f"topology (hosts {sorted(hosts)}, roles "
                        f"{sorted({r for r in roles.values() if r})})")
    out = {}
    for h, info in hosts.items():
        v = overrides.get(h, overrides.get(roles[h], info.get(key)))
        if v is not None:
            out[h] = v
    return out


@dataclass
class RunPlan:
    roles: dict[str, list[str]]
    placement: dict[str, list[int]]
    placement_plan: dict | None          # the controller's, when it placed a chain
    parts: dict[str, list[tuple[str, int]]]  # client -> (node, segment) of its model
    model_kwargs: dict[str, Any]
    iters: int
    configs: dict[str, dict] = field(default_factory=dict)  # node -> its config
    data_links: list[tuple[str, str]] = field(default_factory=list)  # hops that carry data
    shard_info: dict[str, dict] = field(default_factory=dict)


def message_budget(model_kwargs: dict[str, Any], batch: int, clients: int) -> int:
    """A bound on the largest message a run of this model sends, with room to spare: a whole
    model's state three times over (weights, momentum, a migration's extras) plus every client's
    largest activation batch, times 4, plus 16 MiB; never above the protocol's default."""
    model = build_model(**model_kwargs, seed=0)
    size = model_kwargs.get("image_size", 28)
    stats = unit_stats(model, (model_kwargs.get("in_channels", 1), size, size))
    params = 4 * sum(u.params for u in stats)
    act = 4 * batch * max(u.out_elems for u in stats)
    return min(DEFAULT_MAX_MESSAGE_BYTES, 4 * (3 * params + clients * act) + (16 << 20))


def plan_run(cfg: RunConfig, scheme: Scheme, topo: Topo, roles_of: dict[str, str | None],
             limits: dict[str, dict[str, Any]], cycles: dict[str, float], *, run_id: str,
             control: str, ip: Any, checkpoint: Any, topology: str = "",
             remote_control: str = "") -> RunPlan:
    """The run's plan. `ip(host)` gives a host's data-plane address, `checkpoint(host)` its
    checkpoint path, `control` the controller's ipc:// address; `remote_control` the ipc://
    address a host of `cluster.remote` dials instead (its machine's control forwarder)."""
    unknown = sorted(set(cfg.cluster.remote) - set(topo.hosts()))
    if unknown:
        raise PlanError(f"config field 'cluster.remote': no host {unknown} in topology "
                        f"{topology!r} (hosts {topo.hosts()})")
    # Built hosts keep the topology's order (Mininet adds them as topo.hosts() lists them).
    roles = {r: [h for h, hr in roles_of.items() if hr == r]
             for r in (*scheme.roles, *cfg.net.tiers)}
    missing = [r for r, hosts in roles.items() if not hosts]
    if missing:
        raise PlanError(f"topology {topology!r}: scheme {cfg.scheme.name!r} needs hosts with "
                        f"role {missing} (roles {list(scheme.roles)}; found {roles})")
    clients = roles["client"]
    info = dataset_info(cfg.data.dataset, cfg.data.root)
    model_kwargs = {"name": cfg.model.name, "num_classes": info["num_classes"],
                    "in_channels": info["in_channels"], "image_size": info["image_size"]}
    nseg = len(cfg.model.cuts) + 1
    placement_plan = None
    try:
        if cfg.net.tiers:
            mem = {h: v["mem_mb"] for h, v in limits.items() if "mem_mb" in v}
            placement, placement_plan = place_chain(scheme, nseg, roles, cfg.net.tiers, mem,
                                                    model_kwargs, cfg.model.cuts,
                                                    cfg.train.batch_size,
                                                    cfg.train.momentum)
        else:
            placement = scheme.placement(nseg, roles)
    except ValueError as e:
        raise PlanError(f"scheme {cfg.scheme.name!r}: {e}") from None
    # A client's model: a segment one of its own relays holds comes from that relay (with
    # several relays per tier, each trains its own copy).
    chains = relays_of(topo, roles, cfg.net.tiers) if cfg.net.tiers else {}
    parts = {c: [(next((r for r in chains.get(c, []) if s in placement.get(r, [])), n), s)
                 for n, s in scheme.model_of(c, placement, nseg)] for c in clients}
    train = load_dataset(cfg.data.dataset, "train", root=cfg.data.root, limit=cfg.data.train_limit,
                         seed=cfg.run.seed)
    shards = partition(train.y, len(clients), scheme=cfg.data.partition, alpha=cfg.data.alpha,
                       seed=cfg.run.seed)
    mean_shard = sum(len(s) for s in shards) / len(shards)
    iters = cfg.train.iters_per_round or math.ceil(mean_shard / cfg.train.batch_size)
    plan = RunPlan(roles, placement, placement_plan, parts, model_kwargs, iters)
    base = {"run": run_id, "scheme": cfg.scheme.name, "scheme_options": cfg.scheme.options,
            "model": model_kwargs, "cuts": cfg.model.cuts, "roles": roles, "placement": placement,
            "shards": {c: len(s) for c, s in zip(clients, shards, strict=True)},
            "seed": cfg.run.seed, "control": control, "threads": 1,
            # the shared sections, as the nodes read them (nodes.settings)
            "train": cfg.train.model_dump(), "timeouts": cfg.timeouts.model_dump(),
            "fault": cfg.fault.model_dump(), "transport": cfg.transport.model_dump()}
    compute = {"flops_per_cycle": cfg.devices.flops_per_cycle,
               "backward_flops_factor": cfg.devices.backward_flops_factor}
    configs = plan.configs
    for role, hosts in roles.items():
        for name in hosts:
            if name in configs:
                raise PlanError(f"host {name} has two roles in scheme {cfg.scheme.name!r}")
            configs[name] = {**base, "name": name, "role": role, "relay": role in cfg.net.tiers,
                             "segments": placement.get(name, []), "peers": {}, "accept": [],
                             "compute": {**compute, "cycles_per_s": cycles.get(name)},
                             "checkpoint": checkpoint(name)}
            if name in cfg.cluster.remote:  # on another machine (docs/cluster.md)
                configs[name].update(control=remote_control, ship_checkpoint=True)
    if cfg.efficiency.compression:  # every node packs and unpacks what crosses its cuts
        for nc in configs.values():
            nc["compression"] = cfg.efficiency.compression
    for h, n in per_host(topo, "threads", cfg.devices.threads, roles_of).items():
        if h in configs:  # more torch threads for this node (base: 1, one core's share)
            configs[h]["threads"] = n
    own = per_host(topo, "client_weights", cfg.to_dict()["devices"]["client_weights"], roles_of)
    for i, c in enumerate(clients):
        configs[c]["index"] = i
        if c in own:
            configs[c]["client_weights"] = own[c]
        configs[c]["data"] = {"name": cfg.data.dataset, "root": cfg.data.root,
                              "limit": cfg.data.train_limit, "indices": shards[i].tolist()}
    # A client's connection to the server runs through its chain of relays, if any: the
    # client dials the first relay, each relay dials the next as that client.
    paths = [[d, *(chains.get(d, []) if r in roles["server"] else []), r]
             for d, r in scheme.connections(roles)]
    routers = sorted({h for p in paths for h in p[1:]})
    # A port per listening node, so the loopback network can share one address.
    addr = {r: f"tcp://{ip(r)}:{cfg.net.port + i}" for i, r in enumerate(routers)}
    plan.data_links = list(dict.fromkeys(q for p in paths for q in pairwise(p)))
    for dealer, *relays, router in paths:
        configs[dealer]["peers"][router] = addr[(*relays, router)[0]]
        for a, b in pairwise([*relays, router]):
            configs[a].setdefault("proxies", {})[dealer] = addr[b]
        for b in (*relays, router):
            configs[b]["listen"] = addr[b]
            configs[b]["accept"].append(dealer)
    # Every node knows where each listener is (whose public key to expect there) and the
    # receive budget: frames above the largest message the run can send are refused unread.
    budget = cfg.security.max_message_bytes or message_budget(
        model_kwargs, cfg.train.batch_size, len(clients))
    conns = cfg.security.max_connections or 2 * len(topo.hosts()) + 8
    for nc in configs.values():
        nc.update(listeners=dict(addr), max_message_bytes=budget, max_connections=conns)
    plan.shard_info = {c: {"samples": len(s),
                           "labels": torch.bincount(train.y[torch.as_tensor(s)],
                                                    minlength=info["num_classes"]).tolist()}
                       for c, s in zip(clients, shards, strict=True)}
    return plan
