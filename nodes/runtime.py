"""One node process: build its context from a config, then obey the controller round by round.

`run_node(config)` is a plain function so a fork-server can start nodes later; `python -m
nodes --config FILE` calls it. The node talks to the controller over an ipc:// control socket
(outside the emulated network, so control traffic never shows on a link) and to its peers
over TCP on the emulated network. Before saying HELLO to the controller it opens the data
plane: every DEALER says HELLO to its ROUTER and every ROUTER waits for the HELLOs it expects,
so afterwards any node may speak first. After each round it checkpoints and sends a REPORT
(with `ship_checkpoint`, a node on another machine than the controller's, the checkpoint file's
bytes go with it: the controller has no access to this machine's files). Any error is sent to
the controller as ERROR with its traceback and the process exits non-zero.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import time
import traceback
from typing import Any

import torch
import zmq

from nodes.compression import attach_compression, compression_report
from nodes.context import ComputeModel, NodeContext, count_flops
from nodes.data import load_dataset
from nodes.dataplane import open_data_plane, server_at
from nodes.fault import COMMANDS as RECOVERY
from nodes.fault import start_heartbeat
from nodes.migrate import COMMANDS as MIGRATION
from nodes.models import build_model, split_model, unit_stats
from nodes.protocol import DEFAULT_MAX_MESSAGE_BYTES, Interrupted, Plane, reuse_receive_memory
from nodes.schemes import get_scheme
from nodes.selection import take_part
from nodes.settings import Timeouts, Train, Transport

log = logging.getLogger("sledge.node")
PR_SET_PDEATHSIG = 1
REQUIRED = ("name", "role", "run", "scheme", "model", "cuts", "segments", "control", "roles")


def _die_with_parent() -> None:
    # If the controller dies (even by SIGKILL) the node must not linger.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def check_config(config: dict[str, Any]) -> None:
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"node config: missing field(s) {missing}")


def build_context(config: dict[str, Any], plane: Plane) -> NodeContext:
    name, run = config["name"], config["run"]
    model = build_model(**config["model"], seed=config.get("seed", 0))
    segments = split_model(model, config["cuts"])
    held = {i: segments[i] for i in config["segments"]}
    # The shared sections (nodes.settings): their defaults are the run config's own.
    train = Train.model_validate(config.get("train") or {})
    timeouts = Timeouts.model_validate(config.get("timeouts") or {})
    lr, momentum = train.lr, train.momentum
    optimizers = {i: torch.optim.SGD(s.parameters(), lr=lr, momentum=momentum)
                  for i, s in held.items() if any(True for _ in s.parameters())}
    data = None
    if config.get("data"):
        d = config["data"]
        full = load_dataset(d["name"], "train", root=d.get("root"), limit=d.get("limit"),
                            seed=config.get("seed", 0))
        data = full.subset(torch.as_tensor(d["indices"], dtype=torch.long))
    router = None
    if config.get("listen"):  # only the identities that dial us may send here
        router = plane.router(name, config["listen"], expected=set(config.get("accept", [])))
    # The key to expect is the listener's at that address: on a chain a client's peer (the
    # server) is reached through its first relay's address.
    peers = {peer: plane.dealer(name, addr, server_at(config, addr))
             for peer, addr in config.get("peers", {}).items()}
    # A relay speaks upstream as each client it serves (nodes.schemes.common).
    proxies = {client: plane.dealer(client, addr, server_at(config, addr))
               for client, addr in config.get("proxies", {}).items()}
    compute = config.get("compute") or {}
    ctx = NodeContext(
        name=name, role=config["role"], run=run, segments=held, optimizers=optimizers,
        roles={r: list(h) for r, h in config["roles"].items()}, router=router,
        placement={n: list(s) for n, s in config.get("placement", {}).items()},
        peers=peers, proxies=proxies, data=data, batch_size=train.batch_size,
        seed=config.get("seed", 0) * 1000 + config.get("index", 0),
        run_seed=config.get("seed", 0), num_segments=len(segments),
        shard_sizes=dict(config.get("shards", {})),
        step_timeout_s=timeouts.step_s, ckpt_path=config.get("checkpoint"),
        compute_model=ComputeModel(float(compute["cycles_per_s"]),
                                   float(compute.get("flops_per_cycle", 1.0)))
        if compute.get("cycles_per_s") else None, plane=plane)
    m = config["model"]
    macs = {u.name: u.macs for u in unit_stats(
        model, (m.get("in_channels", 1), m.get("image_size", 28), m.get("image_size", 28)))}
    count_flops(ctx, [(unit, macs[n]) for s in held.values() for n, unit in s.named_children()],
                float(compute.get("backward_flops_factor", 2.0)))
    attach_compression(ctx, config)
    return ctx


def prepare_transport(config: dict[str, Any]) -> bool:
    """The process-wide transport settings of the config's `transport` section; call before
    the first zmq.Context, whose I/O thread allocates every received frame and must find the
    malloc settings in place (nodes.protocol.reuse_receive_memory). True if memory is reused."""
    if not Transport.model_validate(config.get("transport") or {}).reuse_receive_memory:
        return False
    return reuse_receive_memory(int(config.get("max_message_bytes") or DEFAULT_MAX_MESSAGE_BYTES))


def shipped_checkpoint(ctx: NodeContext) -> dict[str, torch.Tensor]:
    """The checkpoint file just written, as one uint8 tensor for the REPORT: the controller
    writes these bytes unchanged, so it evaluates exactly what a local node leaves it. Its size
    is bounded like any message (the run's max_message_bytes, above a checkpoint's size)."""
    with open(ctx.ckpt_path, "rb") as f:
        return {"checkpoint": torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)}


def run_node(config: dict[str, Any]) -> int:
    """Run one node until the controller says stop. Returns the process exit code."""
    check_config(config)
    _die_with_parent()
    torch.set_num_threads(int(config.get("threads", 1)))
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {config['name']} %(message)s")
    prepare_transport(config)
    zctx = zmq.Context()
    plane = Plane.from_config(zctx, config)
    control = plane.dealer(config["name"], config["control"], "controller")
    ctx = hb = None
    try:
        scheme = get_scheme(config["scheme"], **config.get("scheme_options", {}))
        ctx = build_context(config, plane)
        round_fn = scheme.round_of(ctx.role, relay=bool(config.get("relay")))
        # The run's recovery epoch (testbed.run.recovery): stamped on everything this node sends,
        # control included, so the controller drops reports of an aborted attempt.
        ctx.set_epoch(int(config.get("epoch", 0)))
        control.epoch = ctx.epoch
        if config.get("restore_round") is not None:  # restarted or resumed (testbed.run.recovery)
            ctx.restore(int(config["restore_round"]))
        else:
            ctx.checkpoint(0)  # what a failure in round 1 rolls back to
        hb = start_heartbeat(ctx, zctx, config)
        open_data_plane(ctx, list(config.get("accept", [])),
                        Timeouts.model_validate(config.get("timeouts") or {}).start_s)
        # The data-plane bytes so far (the HELLOs) belong to start-up, not to round 1.
        control.send("HELLO", meta={"pid": os.getpid(), "role": ctx.role,
                                    "proto": ctx.proto_stats()})
        all_clients = list(ctx.clients)
        ship = bool(config.get("ship_checkpoint")) and bool(ctx.ckpt_path)
        ctx.state = "idle"
        while True:
            _, msg = control.recv(config.get("idle_timeout_s", 3600.0))
            cmd = msg.meta.get("cmd") if msg.type == "CTRL" else None
            if cmd == "round":
                ctx.reset_round()
                t0 = time.perf_counter()
                try:  # a client the controller did not select sits the round out
                    if take_part(ctx, msg.meta, all_clients):
                        round_fn(ctx, msg.round, int(msg.meta["iters"]))
                except (Interrupted, ConnectionError, TimeoutError) as e:
                    if hb is None:  # no recovery in this run: fail as before
                        raise
                    # A peer died or the controller aborted: wait for its rollback.
                    log.warning("round %d aborted: %s", msg.round, e)
                    control.send("ABORTED", round=msg.round,
                                 meta={"error": f"{type(e).__name__}: {e}"[:2000]})
                    continue
                ctx.extra["round_s"] = time.perf_counter() - t0
                compression_report(ctx)
                ctx.checkpoint(msg.round)
                ctx.state = "idle"
                control.send("REPORT", round=msg.round, meta=ctx.round_report(),
                             tensors=shipped_checkpoint(ctx) if ship else None)
            elif cmd in RECOVERY:  # between attempts of a round (nodes.fault)
                out = RECOVERY[cmd](ctx, scheme, zctx, msg.meta)
                control.epoch = ctx.epoch
                control.send("REPORT", round=msg.round, meta={"cmd": cmd, **out})
            elif cmd in MIGRATION:  # between rounds (nodes.migrate)
                out = MIGRATION[cmd](ctx, scheme, zctx, {**msg.meta, "round": msg.round})
                control.send("REPORT", round=msg.round, meta={"cmd": cmd, **out})
            elif cmd == "stop":
                control.send("BYE", meta={"proto": ctx.proto_stats()})
                return 0
            else:
                log.warning("ignoring control message %s %s", msg.type, cmd)
    except Exception as e:
        log.error("node failed: %s", e)
        tb = traceback.format_exc()
        log.error(tb)
        # The controller may be gone; the exit code still tells.
        with contextlib.suppress(Exception):
            control.send("ERROR", meta={"error": f"{type(e).__name__}: {e}"[:2000],
                                        "traceback": tb[-8000:]})
        return 1
    finally:
        if hb is not None:
            hb.stop()
        for ep in (ctx.data_endpoints() if ctx else []):
            ep.close()
        control.close()
        plane.close()
        zctx.term()
