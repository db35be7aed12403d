"""What a scheme gets to work with on one node: segments, optimizers, data, endpoints, metrics.

The runtime (nodes.runtime) builds a NodeContext from the node's config; schemes only use it.
It owns the per-round bookkeeping a scheme should not repeat: compute timing, the loss it
reports, scheme counters, the data-plane byte counters and the names of received tensors, the
mini-batch stream, in-order message delivery per peer, and the checkpoint file.

Compute is also counted in FLOPs (algorithms.md 11.1): hooks on every unit of the segments the
node holds add 2 x MACs per sample for each forward and beta times that when the backward
passes through the unit. With a ComputeModel (a device of `cycles_per_s`, `flops_per_cycle`),
every compute block lasts at least FLOPs / (eta * f): the node sleeps the difference (11.8),
and reports the measured and the modelled time beside the time the block took.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from nodes.data import ArrayDataset
from nodes.protocol import Endpoint, Message


def save_state(state: dict[str, Any], path: str) -> None:
    """torch.save through memory and one plain write: on a full disk torch's zip writer
    fails with 'unexpected pos ...', a plain write with OSError 'No space left on device'
    naming the file. A partial file is removed."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_file(buf.getbuffer(), path)


def write_file(data: bytes | memoryview, path: str) -> None:
    """One plain write of `data`, synced to disk; on failure the partial file is removed and
    the OSError names the file."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(path)
        if e.filename is None:
            e.filename = path
        raise


def install_checkpoint(tmp: str, path: str, keep_prev: bool = True) -> None:
    """Make the fully written `tmp` the checkpoint at `path` by a rename (a reader sees the old
    file or the new one, never half of one); with keep_prev the file it replaces becomes
    `path.prev`. Nodes and the controller (for a remote node's checkpoint) keep them alike."""
    if keep_prev and os.path.exists(path):
        os.replace(path, f"{path}.prev")
    os.replace(tmp, path)


@dataclass(frozen=True)
class ComputeModel:
    """A device computing `flops_per_cycle` FLOPs per cycle at `cycles_per_s` (11.1-11.2)."""

    cycles_per_s: float
    flops_per_cycle: float = 1.0

    def seconds(self, flops: float) -> float:
        return flops / (self.flops_per_cycle * self.cycles_per_s)


def count_flops(ctx: NodeContext, units: Iterable[tuple[nn.Module, int]],
                backward_factor: float) -> None:
    """Count into ctx.flops the work of each (unit, forward MACs per sample): its forward as
    it runs, its backward when autograd reaches its output. Hooks survive deepcopy (server
    copies share the counter)."""

    def hook(macs: int) -> Callable[..., None]:
        def forward(_m: nn.Module, _args: Any, out: Any) -> None:
            if not isinstance(out, torch.Tensor):
                return
            flops = 2.0 * macs * out.shape[0]
            ctx.flops += flops
            if out.requires_grad:
                out.register_hook(lambda g: ctx._add_flops(backward_factor * flops))
        return forward

    for unit, macs in units:
        if macs:
            unit.register_forward_hook(hook(macs))


@dataclass
class NodeContext:
    name: str
    role: str
    run: str
    segments: dict[int, nn.Sequential]
    optimizers: dict[int, torch.optim.Optimizer]
    roles: dict[str, list[str]]               # role -> node names (the whole run's)
    placement: dict[str, list[int]] = field(default_factory=dict)  # node -> segments (the run's)
    router: Endpoint | None = None            # where peers connect to us
    peers: dict[str, Endpoint] = field(default_factory=dict)  # where we connect to
    # A relay of a chain: client -> the endpoint that speaks upstream as that client.
    proxies: dict[str, Endpoint] = field(default_factory=dict)
    data: ArrayDataset | None = None
    batch_size: int = 32
    seed: int = 0                             # this node's own (data order)
    run_seed: int = 0                         # the run's, the same on every node
    num_segments: int = 0                     # of the whole model
    shard_sizes: dict[str, int] = field(default_factory=dict)  # client -> training samples
    step_timeout_s: float = 300.0
    ckpt_path: str | None = None
    compute_model: ComputeModel | None = None  # None: compute as fast as this CPU does
    plane: Any = None  # protocol.Plane: makes endpoints with the run's keys and bounds
    epoch: int = 0                  # recovery epoch (set_epoch; docs/fault-tolerance.md)
    # Compression of cut traffic and low-precision client weights (nodes.compression).
    cut: Any = None                 # CutCodec: unpacks compressed ACT/GRAD in expect()
    wquant: Any = None              # WeightQuantizer: wraps step() on a client
    # per-round metrics, reset by the runtime
    compute_s: float = 0.0          # time in compute blocks, padding included
    compute_measured_s: float = 0.0  # the computation itself
    compute_modelled_s: float = 0.0  # FLOPs / (eta * f) of the blocks
    flops: float = 0.0
    cpu_s: float = 0.0
    loss_sum: float = 0.0
    loss_n: int = 0
    samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # What the node is doing, for the controller's progress line (sent with each heartbeat):
    # starting | training | waiting (for a peer's message) | idle; optimizer steps this round.
    state: str = "starting"
    iteration: int = 0
    counters: Counter[str] = field(default_factory=Counter)
    rx_tensors: set[str] = field(default_factory=set)  # "TYPE:name" of every tensor received
    _pending: dict[int, deque] = field(default_factory=dict)
    _cursor: int = 0
    _order: torch.Tensor | None = None
    _gen: torch.Generator | None = None
    _depth: int = 0

    @property
    def clients(self) -> list[str]:
        return self.roles.get("client", [])

    @property
    def servers(self) -> list[str]:
        return self.roles.get("server", [])

    @property
    def downstream(self) -> list[str]:
        """The clients a relay serves (whose traffic it relays), in run order."""
        return [c for c in self.clients if c in self.proxies]

    # -- model --------------------------------------------------------------------------------
    def _held(self, segs: Iterable[int] | None) -> list[int]:
        return sorted(self.segments) if segs is None else sorted(segs)

    def model(self, segs: Iterable[int] | None = None) -> nn.Sequential:
        """Segments `segs` (default: all this node holds), composed in model order."""
        return nn.Sequential(*(self.segments[i] for i in self._held(segs)))

    def zero_grad(self, segs: Iterable[int] | None = None) -> None:
        for i in self._held(segs):
            if i in self.optimizers:
                self.optimizers[i].zero_grad(set_to_none=True)

    def step(self, segs: Iterable[int] | None = None) -> None:
        self.iteration += 1
        if self.wquant is not None:
            self.wquant.before_step()
        for i in self._held(segs):
            if i in self.optimizers:
                self.optimizers[i].step()
        if self.wquant is not None:
            self.wquant.after_step()

    def count(self, **amounts: int) -> None:
        """Add to this round's scheme counters (reported with the round)."""
        self.counters.update(amounts)

    def _add_flops(self, flops: float) -> None:
        self.flops += flops

    @contextmanager
    def compute(self) -> Iterator[None]:
        """Time a block of local computation (wall and this thread's CPU); with a compute
        model, pad it to its modelled duration. A nested block is part of the outer one."""
        if self._depth:
            yield
            return
        self._depth += 1
        w, c, f = time.perf_counter(), time.thread_time(), self.flops
        done = False
        try:
            yield
            done = True
        finally:
            self._depth -= 1
            measured = time.perf_counter() - w
            self.compute_measured_s += measured
            self.cpu_s += time.thread_time() - c
            spent = measured
            if self.compute_model is not None:
                modelled = self.compute_model.seconds(self.flops - f)
                self.compute_modelled_s += modelled
                if done and modelled > measured:
                    time.sleep(modelled - measured)
                    spent = time.perf_counter() - w
            self.compute_s += spent

    def record_loss(self, loss: float, n: int) -> None:
        self.loss_sum += float(loss) * n
        self.loss_n += n

    # -- data ---------------------------------------------------------------------------------
    def batches(self, iters: int,
                epoch: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`iters` mini-batches, walking seeded epochs over the shard across rounds (the tail
        of each pass that does not fill a batch is skipped). epoch=True: the `iters` batches
        are exactly one pass over a fresh shuffle of the shard, the last one partial if the
        shard is not a multiple of the batch size (DataLoader's drop_last=False)."""
        if self.data is None or len(self.data) == 0:
            raise RuntimeError(f"node {self.name}: no training data on this node")
        if self._gen is None:
            self._gen = torch.Generator().manual_seed(self.seed)
        n, b = len(self.data), min(self.batch_size, len(self.data))
        if epoch:
            yield from self._epoch(iters, n, b)
            return
        for _ in range(iters):
            if self._order is None or self._cursor + b > n:
                self._order, self._cursor = torch.randperm(n, generator=self._gen), 0
            idx = self._order[self._cursor:self._cursor + b]
            self._cursor += b
            self.samples += b
            yield self.data.x[idx], self.data.y[idx]

    def _epoch(self, iters: int, n: int, b: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if -(-n // b) != iters:
            raise RuntimeError(
                f"node {self.name}: epoch_rounds: a shard of {n} samples is {-(-n // b)} "
                f"batches of {b}, but a round has {iters} steps (every client needs "
                f"ceil(shard / batch_size) steps: equal shards, iters_per_round unset)")
        self._order, self._cursor = torch.randperm(n, generator=self._gen), 0
        while self._cursor < n:
            idx = self._order[self._cursor:self._cursor + b]
            self._cursor += len(idx)
            self.samples += len(idx)
            yield self.data.x[idx], self.data.y[idx]

    # -- messages -----------------------------------------------------------------------------
    def endpoint(self, peer: str) -> Endpoint:
        return self.peers.get(peer, self.router)

    def expect(self, ep: Endpoint, mtype: str, rnd: int, step: int | None = None,
               peer: str | None = None, *, decode: bool = True) -> tuple[str, Message]:
        """The next data-plane message on `ep`, which must be `mtype` for round `rnd` (and
        `step`, when given). With `peer`, the next message from that peer: what others send
        meanwhile is kept, in order, for later calls (a server serving one client at a time
        leaves the other clients' messages queued). With a cut codec, compressed frames come
        back dense (decode=False: as sent, for a relay passing them on)."""
        pending = self._pending.setdefault(id(ep), deque())
        while True:
            i = next((i for i, (s, _) in enumerate(pending) if peer is None or s == peer), None)
            got = None
            if i is not None:  # by index: Messages hold tensors, which do not compare as bools
                got = pending[i]
                del pending[i]
            while got is None:
                self.state = "waiting"
                try:
                    sender, msg = ep.recv(self.step_timeout_s)
                finally:
                    self.state = "training"
                self.rx_tensors.update(f"{msg.type}:{t}" for t in msg.tensors)
                if peer is not None and sender != peer:
                    pending.append((sender, msg))
                else:
                    got = sender, msg
            sender, msg = got
            if msg.type == mtype and msg.round == rnd and (step is None or msg.step == step):
                break
            # Not what this moment expects: dropped and counted, and the wait goes on (one
            # stray or forged message must not fail a run; a missing one still times out).
            ep.drop(sender, msg, f"expected {mtype} round {rnd}"
                    f"{'' if step is None else f' step {step}'}{' from ' + peer if peer else ''}")
        if decode and self.cut is not None:  # the flow's client: the sender, or our identity
            self.cut.unpack(sender if ep is self.router else ep.name, msg)
        return sender, msg

    def data_endpoints(self) -> list[Endpoint]:
        return (([self.router] if self.router else []) + list(self.peers.values())
                + list(self.proxies.values()))

    # -- reporting ----------------------------------------------------------------------------
    def proto_stats(self) -> dict[str, Any]:
        """Cumulative data-plane statistics over all this node's endpoints."""
        tot: Counter[str] = Counter()
        by_type: Counter[str] = Counter()
        rejected: Counter[str] = Counter()
        for ep in self.data_endpoints():
            tot.update(tx_bytes=ep.bytes_sent, rx_bytes=ep.bytes_recv,
                       tx_header_bytes=ep.header_bytes_sent, rx_header_bytes=ep.header_bytes_recv,
                       tx_msgs=ep.msgs_sent, rx_msgs=ep.msgs_recv)
            for t, d in ep.by_type.items():
                by_type[f"{t}.tx"] += d.get("tx_bytes", 0)
                by_type[f"{t}.rx"] += d.get("rx_bytes", 0)
                by_type[f"{t}.tx_msgs"] += d.get("tx_msgs", 0)
                by_type[f"{t}.rx_msgs"] += d.get("rx_msgs", 0)
            rejected.update(ep.rejections())
        return {**tot, "by_type": dict(by_type), "rejected": dict(rejected)}

    def round_report(self) -> dict[str, Any]:
        modelled = {} if self.compute_model is None else {
            "compute_modelled_s": self.compute_modelled_s,
            "cycles_per_s": self.compute_model.cycles_per_s}
        return {"compute_s": self.compute_s, "compute_measured_s": self.compute_measured_s,
                **modelled, "flops": self.flops,
                "cpu_s": self.cpu_s, "loss_sum": self.loss_sum,
                "loss_n": self.loss_n, "samples": self.samples, **self.extra,
                "counters": dict(self.counters), "rx_tensors": sorted(self.rx_tensors),
                "proto": self.proto_stats()}

    def reset_round(self) -> None:
        self.compute_s = self.cpu_s = self.loss_sum = self.flops = 0.0
        self.compute_measured_s = self.compute_modelled_s = 0.0
        self.loss_n = self.samples = 0
        self.extra = {}
        self.counters = Counter()
        self.rx_tensors = set()
        self.iteration = 0
        self.state = "training"

    # -- checkpoints and recovery (docs/fault-tolerance.md) -----------------------------------
    def checkpoint(self, rnd: int) -> None:
        """Write, atomically (tmp + rename), everything needed to redo round `rnd` + 1 exactly:
        segments, optimizer state, the data order (generator, permutation, cursor) and the
        global RNG. The previous checkpoint is kept as `<path>.prev`: a node may be one round
        ahead of the last round every node completed, which is where a rollback goes."""
        if not self.ckpt_path:
            return
        state = {"round": rnd, "node": self.name,
                 "segments": {i: s.state_dict() for i, s in self.segments.items()},
                 "optimizers": {i: o.state_dict() for i, o in self.optimizers.items()},
                 "data": {"gen": None if self._gen is None else self._gen.get_state(),
                          "order": self._order, "cursor": self._cursor},
                 "rng": torch.get_rng_state()}
        tmp = f"{self.ckpt_path}.tmp"
        save_state(state, tmp)
        install_checkpoint(tmp, self.ckpt_path)

    def restore(self, rnd: int) -> None:
        """Load the checkpoint of round `rnd` (the current or the previous file) and make it
        the current one again, so the next checkpoint keeps it as `.prev`."""
        if not self.ckpt_path:
            raise RuntimeError(f"node {self.name}: no checkpoint path, cannot restore")
        found = []
        for path in (self.ckpt_path, f"{self.ckpt_path}.prev"):
            if not os.path.exists(path):
                continue
            state = torch.load(path, weights_only=True)
            found.append(state["round"])
            if state["round"] == rnd:
                break
        else:
            raise RuntimeError(f"node {self.name}: no checkpoint of round {rnd} in "
                               f"{self.ckpt_path}[.prev] (found rounds {found})")
        for i, seg in self.segments.items():
            seg.load_state_dict(state["segments"][i])
        for i, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][i])
        data = state.get("data") or {}
        self._gen = None
        if data.get("gen") is not None:
            self._gen = torch.Generator()
            self._gen.set_state(data["gen"])
        self._order, self._cursor = data.get("order"), int(data.get("cursor", 0))
        if state.get("rng") is not None:
            torch.set_rng_state(state["rng"])
        if path != self.ckpt_path:  # the newer file belongs to an attempt being undone
            os.replace(path, self.ckpt_path)

    def set_epoch(self, epoch: int) -> None:
        """Enter recovery epoch `epoch`: messages of older epochs are dropped from now on, and
        what was queued for a scheme from the aborted attempt is forgotten."""
        self.epoch = epoch
        for ep in self.data_endpoints():
            ep.epoch = epoch
        self._pending.clear()

    def set_interrupt(self, interrupt: Callable[[], bool] | None) -> None:
        """Make every data-plane wait give up (protocol.Interrupted) once `interrupt()`."""
        for ep in self.data_endpoints():
            ep.interrupt = interrupt
