"""Controller side of handover and model migration: the model follows the user.

Division of labour: this module changes the network (a UE's attachment moves to another cell's
bridge, `move_attachment`), decides which edge should serve (`serving_edge`: the edge of the
cell of the followed user, or of most clients), and drives a migration of the server node
(`migrate`) through the node-side commands of nodes.migrate. The Experiment only runs rounds;
callers (a scenario's `handover` reaction, or an `on_round` hook) call `handover` between
rounds, so every training step runs on exactly one server and no step is lost or repeated.

A migration: start a node on the new edge host with the old server's config under the new name
(its process, a "standby" until now), have the old node send its segments' weights and
optimizer state as one STATE message over the emulated network (edge - backhaul - edge), check
the hashes of what was sent and what was loaded, repoint every node that dialled the old
server, stop the old node, and update the run's roles, placement, parts and processes. The
event (time, protocol bytes, bytes on each backhaul interface on the way, hashes) goes to the
next round's record and to events.jsonl. See docs/migration.md.
"""

from __future__ import annotations

import copy
import os
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import networkx as nx

from testbed.emu.loopback import counter_delta
from testbed.run.records import console
from testbed.scenario.timeline import Event, EventContext

if TYPE_CHECKING:
    from testbed.scenario.experiment import Experiment


class MigrationFailed(RuntimeError):
    pass


# -- where hosts are ---------------------------------------------------------------------------
def cell_of(exp: Experiment, host: str) -> int | None:
    """The cell a host is attached to now (handovers so far, else its topology `cell` tag)."""
    if host not in exp.attachment:
        exp.attachment[host] = exp.topo.nodeInfo(host).get("cell")
    return exp.attachment[host]


def edge_of_cell(exp: Experiment, cell: int) -> str:
    """The edge host (tier edge, role server or standby) at cell `cell`'s base station."""
    for h in exp.topo.hosts():
        info = exp.topo.nodeInfo(h)
        if (info.get("tier") == "edge" and info.get("cell") == cell
                and info.get("role") in ("server", "standby")):
            return h
    raise MigrationFailed(f"no edge host in cell {cell} (needs a topology with one edge per "
                          f"cell, e.g. topologies/cellular.py edges=per-cell)")


def serving_edge(exp: Experiment, follow: str | None = None) -> str:
    """Policy: the edge of the followed user's cell; without `follow`, of the cell most clients
    are in (a tie keeps the current server's cell when it is among the tied)."""
    if follow is not None:
        if follow not in exp.roles.get("client", []):
            raise MigrationFailed(f"follow={follow!r}: not a client ({exp.roles.get('client')})")
        return edge_of_cell(exp, cell_of(exp, follow))
    votes = Counter(cell_of(exp, c) for c in exp.roles["client"])
    best = max(votes.values())
    current = cell_of(exp, exp.roles["server"][0])
    cell = current if votes.get(current) == best else min(c for c, v in votes.items()
                                                          if v == best)
    return edge_of_cell(exp, cell)


# -- the network -------------------------------------------------------------------------------
def move_attachment(exp: Experiment, ue: str, cell: int) -> dict[str, Any]:
    """Move `ue`'s link from its cell bridge to cell<cell>'s, so its packets cross that cell's
    shaped link from now on. On the loopback network only the bookkeeping moves."""
    old = cell_of(exp, ue)
    ev: dict[str, Any] = {"kind": "handover", "ue": ue, "from_cell": old, "to_cell": cell,
                          "time": time.time()}
    if old == cell:
        return {**ev, "moved": False}
    network = exp.network
    if network.kind == "mininet":
        net = network.net
        src, dst, host = net.get(f"cell{old}"), net.get(f"cell{cell}"), net.get(ue)
        # The switch-side end of the UE's link, wherever earlier handovers put it (Mininet's
        # own records still name the bridge it was created on).
        link = host.defaultIntf().link
        if link is None:
            raise MigrationFailed(f"handover: {ue} has no link")
        intf = link.intf2 if link.intf1.node is host else link.intf1
        if network.caps.ovs:
            out = src.cmd(f"ovs-vsctl del-port {src.name} {intf.name} -- "
                          f"add-port {dst.name} {intf.name}")
        else:  # a port leaving a bridge takes its learnt MACs with it; the UE's next frame
            # teaches the new path to the bridges on the way
            out = src.cmd(f"ip link set {intf.name} nomaster && "
                          f"ip link set {intf.name} master {dst.name} && "
                          f"ip link set {intf.name} up")
        if out.strip():
            raise MigrationFailed(f"handover {ue}: moving {intf.name} to {dst.name}: {out}")
        ev["intf"] = intf.name
        # A UE waiting for a reply sends nothing, and the bridges of the old path would forward
        # to its old cell until their entries age out (300 s): one echo from the UE to its
        # server now teaches them the new path (and takes one round trip).
        server = (exp.roles.get("server") or [None])[0]
        if server is not None and server != ue:
            host.cmd(f"ping -c1 -W1 {network.ip(server)}")
        _reroute(exp, ue, src.name, dst.name)
    exp.attachment[ue] = cell
    return {**ev, "moved": True}


def _reroute(exp: Experiment, ue: str, src: str, dst: str) -> None:
    """The controller's view follows the moved link (declared links, interfaces), then its
    routes are recomputed."""
    links = exp.network.links
    links.declared = [(a, dst if b == src and a == ue else b, p) if ue in (a, b) else (a, b, p)
                      for a, b, p in links.declared]
    ctl = exp.controller
    if ctl is None:
        return
    ctl.intfs[(ue, dst)] = ctl.intfs.pop((ue, src))
    ctl.intfs[(dst, ue)] = ctl.intfs.pop((src, ue))
    ctl.recompute()


def _add_route_pairs(exp: Experiment, pairs: list[tuple[str, str]]) -> None:
    ctl = exp.controller
    if ctl is None:
        return
    ctl.pairs = list(dict.fromkeys([*ctl.pairs, *pairs, *((b, a) for a, b in pairs)]))
    ctl.recompute()


def path_interfaces(exp: Experiment, a: str, b: str) -> list[tuple[str, str]]:
    """(hop "x->y", interface of x towards y) along the topology path from a to b."""
    from testbed.emu.routing import graph_from_topo, neighbour_intfs

    if exp.network.kind != "mininet":
        return []
    g = graph_from_topo(exp.topo).to_undirected()
    path = nx.shortest_path(g, a, b)
    intfs = neighbour_intfs(exp.network.net)
    return [(f"{x}->{y}", intfs[(x, y)]) for x, y in zip(path, path[1:], strict=False)]


# -- the migration -----------------------------------------------------------------------------
def migrate(exp: Experiment, new: str, rnd: int) -> dict[str, Any]:
    """Move the server node to host `new` before round `rnd`; returns the event."""
    (old,) = exp.roles["server"]
    if new == old:
        raise MigrationFailed(f"migrate: {new} already serves")
    t0 = time.perf_counter()
    cfg = exp.cfg
    nc = copy.deepcopy(exp.node_configs[old])
    if nc.get("peers") or nc.get("proxies"):
        raise MigrationFailed(f"migrate: {old} dials {sorted(nc['peers'])}; only a node that "
                              f"only listens (a server) can migrate")
    ports = [int(c["listen"].rsplit(":", 1)[1]) for c in exp.node_configs.values()
             if c.get("listen")]
    addr = f"tcp://{exp.network.ip(new)}:{max(ports) + 1}"
    rename = {r: [new if h == old else h for h in hs] for r, hs in nc["roles"].items()}
    # In the run's recovery epoch: after a rollback, older epochs' messages are dropped.
    nc.update(name=new, listen=addr, accept=[], roles=rename, epoch=exp.recovery.epoch,
              checkpoint=exp.run_dir.file("ckpt", f"{new}.pt"))
    if exp.security:  # its own keys (made for every host at the start of the run)
        nc["security"] = exp.security[new].to_dict()
    path = os.path.join("nodes", f"{new}.json")
    exp.run_dir.write_node_config(path, nc)
    # Watched for heartbeats from its own first one: a node of that name that left (the
    # model was here before) must not make it look silent.
    exp.recovery.liveness.last.pop(new, None)
    exp.procs[new] = exp.launcher.start(exp.network.host(new), exp.run_dir.file(path),
                                        exp.run_dir.file("logs", f"{new}.log"))
    exp.node_configs[new] = nc
    exp.control.collect("HELLO", 0, cfg.timeouts.start_s, f"migration to {new}: start-up",
                        nodes=[new])
    t_started = time.perf_counter()
    _add_route_pairs(exp, [(old, new)])
    hops = path_interfaces(exp, old, new)
    before = exp.network.counters()
    exp.control.send(new, rnd, cmd="migrate_in", **{"from": old})
    exp.control.send(old, rnd, cmd="migrate_out", addr=addr, to=new)
    acks = exp.control.collect("REPORT", rnd, cfg.timeouts.round_s, f"migration {old} -> {new}",
                        nodes=[old, new])
    t_moved = time.perf_counter()
    ifaces = counter_delta(exp.network.counters(), before)
    out, into = acks[old], acks[new]
    if not (out["hash"] == into["hash"] == into["sent_hash"]):
        raise MigrationFailed(f"migration {old} -> {new}: state hash sent {out['hash']} != "
                              f"loaded {into['hash']}")
    # Every node that dialled the old server dials the new one; the new one hears them.
    dialled = [n for n, c in exp.node_configs.items() if old in c.get("peers", {})
               and n not in (old, new)]
    _add_route_pairs(exp, [(n, new) for n in dialled])
    for n, c in exp.node_configs.items():
        if old in c.get("peers", {}) and n != old:
            c["peers"][new] = c["peers"].pop(old)
    rest = [n for n in exp.procs if n != old]
    for n in rest:
        exp.control.send(n, rnd, cmd="repoint", old=old, new=new, addr=addr, accept=dialled)
    repointed = exp.control.collect("REPORT", rnd, cfg.timeouts.start_s, "repoint", nodes=rest)
    t_done = time.perf_counter()
    proc = exp.procs.pop(old)  # first: its exit must not look like a death (testbed.run.recovery)
    exp.control.send(old, rnd, cmd="stop")
    exp.control.collect("BYE", 0, 60, f"stopping {old}", nodes=[old])
    if proc.wait(30) is None:
        proc.stop()
    # The run's bookkeeping: who serves, who holds what, what to evaluate, counter baselines.
    exp.roles = {r: [new if h == old else h for h in hs] for r, hs in exp.roles.items()}
    exp.placement[new] = exp.placement.pop(old)
    exp.parts = {c: [(new if n == old else n, s) for n, s in p] for c, p in exp.parts.items()}
    nc["accept"] = dialled  # a restart of the new node (testbed.run.recovery) waits for them
    del exp.node_configs[old]
    exp.control.rebase(repointed)
    exp.run_dir.write_json("pids.json", {n: p.pid for n, p in exp.procs.items()})
    ev = {"kind": "migration", "before_round": rnd, "from": old, "to": new, "addr": addr,
          "time": time.time(), "time_s": t_done - t0, "start_s": t_started - t0,
          "transfer_s": t_moved - t_started, "repoint_s": t_done - t_moved,
          "node_transfer_s": out["transfer_s"], "bytes": out["bytes"],
          "state_bytes": out["state_bytes"], "tensors": out["tensors"], "hash": into["hash"],
          "repointed": dialled,
          "backhaul": {hop: {"intf": i, "tx_bytes": ifaces.get(i, {}).get("tx_bytes", 0)}
                       for hop, i in hops}}
    console.print(f"migration {old} -> {new} before round {rnd}: {ev['bytes']} bytes in "
                  f"{ev['transfer_s']:.3f}s, whole {ev['time_s']:.2f}s, hash {ev['hash'][:12]}")
    return ev


def handover(exp: Experiment, ue: str, cell: int, rnd: int,
             follow: str | None = None) -> list[dict[str, Any]]:
    """The reaction to `ue` handing over to `cell` before round `rnd`: move its attachment;
    when the serving edge changes (policy: serving_edge), migrate the server there."""
    evs = [move_attachment(exp, ue, cell)]
    exp.log_event(evs[0])
    target = serving_edge(exp, follow)
    if target != exp.roles["server"][0]:
        evs.append(migrate(exp, target, rnd))
        exp.log_event(evs[-1])
    return evs


def on_handover(exp: Experiment, ev: Event, ctx: EventContext) -> dict[str, Any]:
    """The scenario reaction (testbed.scenario.timeline): the attachment moves at once, on whichever
    thread the event fires (a mobility handover mid-round: the UE's traffic to the old edge
    goes on over the backhaul); a migration, if the serving edge changed, waits for the next
    round boundary, on the main thread (ctx.later)."""
    follow = exp.scenario.follow if exp.scenario else None
    hand = move_attachment(exp, ev.user, ev.cell)
    current, target = exp.roles["server"][0], serving_edge(exp, follow)
    out = {k: hand[k] for k in ("from_cell", "to_cell", "moved", "intf") if k in hand}
    out.update(serving=current, target=target)
    if target != current:
        ctx.later(lambda e: _migrate_at_boundary(e, follow))
        out["migration"] = "at the next round boundary"
    return out


def _migrate_at_boundary(exp: Experiment, follow: str | None) -> None:
    runner = exp.scenario_runner
    rnd = runner.round + (0 if runner.phase == "before_round" else 1)
    target = serving_edge(exp, follow)  # later handovers may have changed it again
    if target == exp.roles["server"][0]:
        return
    if rnd > exp.cfg.run.rounds:
        exp.log_event({"kind": "migration_skipped", "to": target, "reason": "no round left"})
        return
    exp.log_event(migrate(exp, target, rnd))
