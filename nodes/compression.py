"""Compression of what crosses a cut (algorithms.md 8.1-8.3) and of a client's own weights (8.4).

Division of labour: a `Codec` is the math of one method, in four pure functions (activation
encode/decode, gradient encode/decode) on tensors; `CutCodec` is one node's use of it, keyed
by (message type, client, round, step): it packs what the node sends and unpacks what it
receives, and remembers, between the two directions, what the way back needs (top-k's
indices, the shape). Schemes never see a compressed tensor: the server side gets the dense
activation as a message's "act" (NodeContext.expect unpacks), the client side gets the dense
gradient with respect to its own activation as "grad". So compression composes with every
split scheme and with relays (each cut of a chain compresses on its own).

On the wire a compressed tensor is a set of raw tensor frames (`act.c3`, `act.v` + `act.i`,
`act.q` + `act.lo` + `act.s`...) and a descriptor in the header's meta under "cut" (method,
dense shape, parameters): no pickle, and the frames are what shrinks.

Methods (RunConfig.compression, e.g. {"method": "c3sl", "R": 4}):
- c3sl: batch-wise circular convolution with R fixed random keys (8.1), by FFT. The payload is
  (B/R) x d both ways: the server's leaf is V, so its gradient (dL/dV = E(dL/dz_hat), E the
  encoder, because the decoder is E's adjoint) is compressed as much; the client turns it into
  dL/dz with the decoder (E's adjoint again).
- topk: per sample the k = ceil(rho*d) largest magnitudes, values + int16/int32 indices or a
  d-bit mask, whichever is smaller (8.2); the gradient goes back as the k values only.
- quant: b-bit uniform (8.3), per tensor or per sample (qgroup), bits packed into bytes;
  activations min/max, gradients symmetric; b=16 is an fp16 cast; straight-through backward.

`WeightQuantizer` trains a client's segments at low precision (8.4, client_qat_bits) or
magnitude-pruned: the module holds the quantized (or pruned) weights, an fp32 master copy takes
the optimizer's steps (straight-through), so forward, checkpoints and evaluation see exactly
the low-precision model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]
PACKABLE_BITS = (1, 2, 4, 8)


class CompressionError(ValueError):
    """A bad compression setting or a compressed message that does not fit; names the field."""


# -- bit packing ------------------------------------------------------------------------------
def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers < 2**bits (bits in 1, 2, 4, 8) packed into bytes, high bits first."""
    flat = q.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    per = 8 // bits
    pad = (-len(flat)) % per
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, per)
    shifts = torch.arange(per - 1, -1, -1, dtype=torch.uint8) * bits
    return (flat << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first `n` values `pack_bits` packed (as int64)."""
    if packed.dtype != torch.uint8:
        raise CompressionError(f"packed bits: expected uint8 frame, got {packed.dtype}")
    if bits == 8:
        out = packed.reshape(-1)
    else:
        per = 8 // bits
        shifts = torch.arange(per - 1, -1, -1, dtype=torch.uint8) * bits
        out = ((packed.reshape(-1, 1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    if len(out) < n:
        raise CompressionError(f"packed bits: {len(out)} values for {n} expected")
    return out[:n].long()


# -- codecs -----------------------------------------------------------------------------------
class Codec:
    """One method. encode_act -> (wire tensors, descriptor, state the gradient needs);
    decode_act -> (dense activation, state); encode_grad(dense grad, state) -> (wire tensors,
    descriptor); decode_grad(wire, descriptor, state) -> dense gradient of the sender's act."""

    method = ""

    def encode_act(self, a: torch.Tensor) -> tuple[Tensors, dict, Any]:
        raise NotImplementedError

    def decode_act(self, t: Tensors, d: dict) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def encode_grad(self, g: torch.Tensor, state: Any) -> tuple[Tensors, dict]:
        raise NotImplementedError

    def decode_grad(self, t: Tensors, d: dict, state: Any) -> torch.Tensor:
        raise NotImplementedError

    def grad_rows_must_match(self) -> bool:
        """Whether the gradient must cover exactly the rows of its activation (EPSL's
        shared/own row split does not)."""
        return True

    def roundtrip(self, a: torch.Tensor) -> torch.Tensor:
        """What the far side of the cut gets for `a` (inference: testbed.run.evaluate)."""
        return self.decode_act(*self.encode_act(a)[:2])[0]


def _need(t: Tensors, name: str, method: str) -> torch.Tensor:
    if name not in t:
        raise CompressionError(f"{method}: compressed message lacks tensor frame {name!r} "
                               f"(has {sorted(t)})")
    return t[name]


class C3SL(Codec):
    """algorithms.md 8.1: v_g = sum_r k_r (*) z_{gR+r}; z_hat_{gR+r} = k_r (x) v_g."""

    method = "c3sl"

    def __init__(self, R: int = 4, seed: int = 0) -> None:
        if not isinstance(R, int) or R < 1:
            raise CompressionError(f"compression field 'R': expected an integer >= 1, got {R!r}")
        self.R, self.seed = R, seed
        self._keys: dict[int, torch.Tensor] = {}  # d -> RFFT of the R keys, (R, d//2+1)

    def keys(self, d: int) -> torch.Tensor:
        """The R unit-norm keys for dimension d (time domain), the same on every node."""
        g = torch.Generator().manual_seed(self.seed * 7919 + d)
        k = torch.randn(self.R, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        return (k / k.norm(dim=1, keepdim=True)).float()

    def _fk(self, d: int) -> torch.Tensor:
        if d not in self._keys:
            self._keys[d] = torch.fft.rfft(self.keys(d), dim=-1)
        return self._keys[d]

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, d) -> (B/R, d): circular convolution with the keys, summed over each group."""
        b, d = z.shape
        if b % self.R:
            raise CompressionError(f"c3sl: batch of {b} samples is not a multiple of R="
                                   f"{self.R} (choose batch_size as a multiple of R)")
        zf = torch.fft.rfft(z.reshape(b // self.R, self.R, d), dim=-1)
        return torch.fft.irfft((zf * self._fk(d)).sum(1), n=d, dim=-1)

    def decode(self, v: torch.Tensor) -> torch.Tensor:
        """(B/R, d) -> (B, d): circular correlation of each group with each key."""
        g, d = v.shape
        vf = torch.fft.rfft(v, dim=-1)
        return torch.fft.irfft(vf[:, None] * self._fk(d).conj(), n=d, dim=-1).reshape(g * self.R, d)

    def roundtrip(self, a: torch.Tensor) -> torch.Tensor:
        pad = (-len(a)) % self.R  # inference batches need not be multiples of R: pad with 0
        full = torch.cat([a, a.new_zeros(pad, *a.shape[1:])])
        return super().roundtrip(full)[:len(a)]

    def encode_act(self, a):
        v = self.encode(a.detach().reshape(len(a), -1))
        return {"act.c3": v.contiguous()}, {"shape": list(a.shape), "R": self.R}, list(a.shape)

    def decode_act(self, t, d):
        shape = d.get("shape")
        v = _need(t, "act.c3", self.method)
        if d.get("R") != self.R or not shape or v.shape != (shape[0] // self.R,
                                                              math.prod(shape[1:])):
            raise CompressionError(f"c3sl: frame 'act.c3' {list(v.shape)} does not fit the "
                                   f"descriptor {d} at R={self.R}")
        return self.decode(v.float()).reshape(shape), shape

    def encode_grad(self, g, state):
        return {"grad.c3": self.encode(g.reshape(len(g), -1)).contiguous()}, {"R": self.R}

    def decode_grad(self, t, d, state):
        return self.decode(_need(t, "grad.c3", self.method).float()).reshape(state)


class TopK(Codec):
    """algorithms.md 8.2: per sample the k largest magnitudes; the gradient at those only."""

    method = "topk"

    def __init__(self, rho: float = 0.25) -> None:
        if not isinstance(rho, (int, float)) or not 0 < rho <= 1:
            raise CompressionError(f"compression field 'rho': expected a keep ratio in (0, 1], "
                                   f"got {rho!r}")
        self.rho = float(rho)

    def k(self, d: int) -> int:
        return max(1, math.ceil(self.rho * d))

    def encode_act(self, a):
        z = a.detach().reshape(len(a), -1)
        d = z.shape[1]
        k = self.k(d)
        idx = z.abs().topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        vals = z.gather(1, idx).contiguous()
        desc = {"shape": list(a.shape), "k": k}
        if 8 * k * (2 if d <= 32768 else 4) <= d:  # indices are smaller than a d-bit mask
            wire = {"act.v": vals, "act.i": idx.to(torch.int16 if d <= 32768 else torch.int32)}
        else:
            mask = torch.zeros_like(z, dtype=torch.uint8).scatter_(1, idx, 1)
            wire = {"act.v": vals, "act.m": torch.from_numpy(np.packbits(mask.numpy(), axis=1))}
        return wire, desc, (idx, list(a.shape))

    def decode_act(self, t, d):
        shape, k = d.get("shape"), d.get("k")
        vals = _need(t, "act.v", self.method)
        b, dim = shape[0], math.prod(shape[1:])
        if "act.i" in t:
            idx = t["act.i"].long()
        else:
            bits = np.unpackbits(_need(t, "act.m", self.method).numpy(), axis=1, count=dim)
            idx = torch.from_numpy(bits).bool().nonzero()[:, 1].reshape(b, -1)
        if vals.shape != (b, k) or idx.shape != (b, k) or int(idx.max()) >= dim:
            raise CompressionError(f"topk: frames {list(vals.shape)}/{list(idx.shape)} do not "
                                   f"fit the descriptor {d}")
        dense = torch.zeros(b, dim).scatter_(1, idx, vals.float())
        return dense.reshape(shape), (idx, shape)

    def encode_grad(self, g, state):
        return {"grad.v": g.reshape(len(g), -1).gather(1, state[0]).contiguous()}, {}

    def decode_grad(self, t, d, state):
        (idx, shape), vals = state, _need(t, "grad.v", self.method)
        if vals.shape != idx.shape:
            raise CompressionError(f"topk: gradient frame {list(vals.shape)} for "
                                   f"{list(idx.shape)} kept entries")
        dense = torch.zeros(len(idx), math.prod(shape[1:])).scatter_(1, idx, vals.float())
        return dense.reshape(shape)


class Quant(Codec):
    """algorithms.md 8.3: b-bit uniform quantization; straight-through on the way back."""

    method = "quant"

    def __init__(self, bits: int = 8, qgroup: str = "tensor", stochastic: bool = False,
                 seed: int = 0) -> None:
        if bits not in (2, 4, 8, 16):
            raise CompressionError(f"compression field 'bits': expected 2, 4, 8 or 16 (16: "
                                   f"an fp16 cast), got {bits!r}")
        if qgroup not in ("tensor", "sample"):
            raise CompressionError(f"compression field 'qgroup': expected 'tensor' or "
                                   f"'sample', got {qgroup!r}")
        self.bits, self.qgroup, self.stochastic = bits, qgroup, bool(stochastic)
        self._gen = torch.Generator().manual_seed(seed)

    def grad_rows_must_match(self) -> bool:
        return False

    def _groups(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1) if self.qgroup == "sample" else x.reshape(1, -1)

    def _round(self, y: torch.Tensor) -> torch.Tensor:
        if self.stochastic:
            return torch.floor(y + torch.rand(y.shape, generator=self._gen))
        return torch.round(y)

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Min/max: (q, lo, s) with x ~ lo + q*s per group."""
        xg = self._groups(x.detach().float())
        lo, hi = xg.min(1).values, xg.max(1).values
        s = ((hi - lo) / (2 ** self.bits - 1)).clamp_min(1e-12)
        q = self._round((xg - lo[:, None]) / s[:, None]).clamp(0, 2 ** self.bits - 1)
        return q, lo, s

    def encode_act(self, a):
        desc = {"shape": list(a.shape), "bits": self.bits}
        if self.bits == 16:
            return {"act.h": a.detach().half().contiguous()}, desc, None
        q, lo, s = self.quantize(a)
        return {"act.q": pack_bits(q, self.bits), "act.lo": lo, "act.s": s}, desc, None

    def decode_act(self, t, d):
        shape = d.get("shape")
        if self.bits == 16:
            return _need(t, "act.h", self.method).float().reshape(shape), None
        lo, s = _need(t, "act.lo", self.method), _need(t, "act.s", self.method)
        q = unpack_bits(_need(t, "act.q", self.method), self.bits, math.prod(shape))
        return (lo[:, None] + q.view(len(lo), -1).float() * s[:, None]).reshape(shape), None

    def encode_grad(self, g, state):
        desc = {"shape": list(g.shape)}
        if self.bits == 16:
            return {"grad.h": g.half().contiguous()}, desc
        gg = self._groups(g.float())
        top = 2 ** (self.bits - 1) - 1
        s = (gg.abs().max(1).values / top).clamp_min(1e-30)
        q = self._round(gg / s[:, None]).clamp(-top, top) + top
        return {"grad.q": pack_bits(q, self.bits), "grad.s": s}, desc

    def decode_grad(self, t, d, state):
        shape = d.get("shape")
        if self.bits == 16:
            return _need(t, "grad.h", self.method).float().reshape(shape)
        s = _need(t, "grad.s", self.method)
        q = unpack_bits(_need(t, "grad.q", self.method), self.bits, math.prod(shape))
        top = 2 ** (self.bits - 1) - 1
        return ((q.view(len(s), -1) - top).float() * s[:, None]).reshape(shape)


METHODS = {"c3sl": (C3SL, ("R",)), "topk": (TopK, ("rho",)),
           "quant": (Quant, ("bits", "qgroup", "stochastic"))}


def make_codec(spec: dict[str, Any] | None, seed: int = 0) -> Codec | None:
    """The codec a RunConfig.compression mapping asks for (None: no compression)."""
    if not spec or spec.get("method", "none") == "none":
        return None
    if not isinstance(spec, dict) or spec.get("method") not in METHODS:
        raise CompressionError(f"compression field 'method': expected one of "
                               f"{['none', *METHODS]}, got {spec!r}")
    cls, allowed = METHODS[spec["method"]]
    extra = sorted(set(spec) - {"method", *allowed})
    if extra:
        raise CompressionError(f"compression: unknown field(s) {extra} for method "
                               f"{spec['method']!r}; valid: {list(allowed)}")
    kw = {k: spec[k] for k in allowed if k in spec}
    return cls(**kw, seed=seed) if cls is not TopK else cls(**kw)


GRAD_OF = {"GRAD": "ACT", "GRAD_BCAST": "ACT", "GRAD2": "ACT2"}


class CutCodec:
    """One node's compression of the cut traffic it sends and receives (module doc)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._out: dict[tuple, Any] = {}  # what we sent: state for the gradient we get back
        self._in: dict[tuple, Any] = {}   # what we got: state for the gradient we send
        self.raw_bytes = 0                # dense float32 bytes of what we packed
        self.wire_bytes = 0               # their compressed frames

    def _count(self, dense: torch.Tensor, wire: Tensors) -> None:
        self.raw_bytes += dense.numel() * 4
        self.wire_bytes += sum(t.numel() * t.element_size() for t in wire.values())

    def pack_act(self, mtype: str, who: str, rnd: int, step: int, a: torch.Tensor,
                 extra: Tensors | None = None, meta: dict | None = None) -> tuple[Tensors, dict]:
        """The tensors and meta of an ACT/ACT2 carrying activation `a` (and `extra` tensors)."""
        wire, desc, state = self.codec.encode_act(a)
        self._out[(mtype, who, rnd, step)] = state
        self._count(a, wire)
        return {**(extra or {}), **wire}, {**(meta or {}),
                                           "cut": {"method": self.codec.method, **desc}}

    def pack_grad(self, mtype: str, who: str, rnd: int, step: int, g: torch.Tensor,
                  meta: dict | None = None) -> tuple[Tensors, dict]:
        """The tensors and meta of a GRAD/GRAD2 carrying `g`, the gradient of the activation
        this node received from `who` at (rnd, step)."""
        key = (GRAD_OF[mtype], who, rnd, step)
        if self.codec.grad_rows_must_match():
            if key not in self._in:
                raise CompressionError(f"{self.codec.method}: {mtype} to {who} round {rnd} "
                                       f"step {step} answers no compressed activation")
            state = self._in.pop(key)
        else:
            state = self._in.pop(key, None)
        wire, desc = self.codec.encode_grad(g.detach(), state)
        self._count(g, wire)
        return wire, {**(meta or {}), "cut": {"method": self.codec.method, **desc}}

    def unpack(self, who: str, msg: Any) -> None:
        """Replace a received message's compressed frames by the dense "act" or "grad"."""
        desc = msg.meta.pop("cut", None)
        if desc is None:
            return
        if desc.get("method") != self.codec.method:
            raise CompressionError(f"{msg.type} from {msg.sender}: compressed with "
                                   f"{desc.get('method')!r}, this run uses "
                                   f"{self.codec.method!r}")
        wire = {k: v for k, v in msg.tensors.items() if "." in k}
        rest = {k: v for k, v in msg.tensors.items() if "." not in k}
        key = (GRAD_OF.get(msg.type, msg.type), who, msg.round, msg.step)
        if msg.type in GRAD_OF:
            state = self._out.pop(key, None)
            if state is None and self.codec.grad_rows_must_match():
                raise CompressionError(f"{msg.type} round {msg.round} step {msg.step}: no "
                                       f"compressed activation of {who} to answer")
            msg.tensors = {**rest, "grad": self.codec.decode_grad(wire, desc, state)}
        else:
            dense, state = self.codec.decode_act(wire, desc)
            if state is not None:
                self._in[key] = state
            msg.tensors = {**rest, "act": dense}


# -- client weights (8.4) ---------------------------------------------------------------------
def fake_quant(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor symmetric int-b: s = max|W|/(2^(b-1) - 1), W_hat = clamp(round(W/s))*s."""
    top = 2 ** (bits - 1) - 1
    s = w.abs().max().clamp_min(1e-12) / top
    return torch.clamp(torch.round(w / s), -top, top) * s


def prune_mask(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """Keep all but the `fraction` smallest magnitudes."""
    n = int(fraction * w.numel())
    if n == 0:
        return torch.ones_like(w, dtype=torch.bool)
    thresh = w.abs().reshape(-1).kthvalue(n).values
    return w.abs() > thresh


class WeightQuantizer:
    """Low-precision (`bits`) or pruned (`prune` fraction) training of a node's segments: the
    modules hold the projected weights, `master` the fp32 copies the optimizer steps on
    (straight-through: the gradient at the projected weights updates the master)."""

    def __init__(self, modules: list[torch.nn.Module], bits: int | None = None,
                 prune: float | None = None) -> None:
        if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 16):
            raise CompressionError(f"client_weights field 'bits': expected 2..16, got {bits!r}")
        if prune is not None and not (isinstance(prune, (int, float)) and 0 <= prune < 1):
            raise CompressionError(f"client_weights field 'prune': expected a fraction in "
                                   f"[0, 1), got {prune!r}")
        self.bits, self.prune = bits, prune
        # weights only: biases and BN parameters stay fp32 (8.4)
        self.params = [p for m in modules for n, p in m.named_parameters() if n.endswith("weight")
                       and p.dim() > 1]
        self.master = [p.detach().clone() for p in self.params]
        self.project()

    def project(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                w = m
                if self.prune:
                    w = w * prune_mask(w, self.prune)
                if self.bits:
                    w = fake_quant(w, self.bits)
                p.copy_(w)
        self._versions = [p._version for p in self.params]

    def adopt(self) -> None:
        """Weights loaded from outside since the last projection (an SL hand-off, SFL's
        W_DOWN average) become the masters."""
        with torch.no_grad():
            for i, (p, m) in enumerate(zip(self.params, self.master, strict=True)):
                if p._version != self._versions[i]:
                    m.copy_(p)

    def sync(self) -> None:
        """Adopt and project: the device holds low-precision weights again (end of round)."""
        self.adopt()
        self.project()

    def before_step(self) -> None:
        """Put the masters (adopting outside loads) in the modules so the optimizer steps them."""
        self.adopt()
        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                p.copy_(m)

    def after_step(self) -> None:
        with torch.no_grad():
            for p, m in zip(self.params, self.master, strict=True):
                m.copy_(p)
        self.project()

    def stats(self) -> dict[str, Any]:
        """Distinct values and the zero fraction per weight tensor (what the device holds)."""
        return {"levels": [int(p.detach().unique().numel()) for p in self.params],
                "zero_fraction": [float((p == 0).float().mean()) for p in self.params]}


# -- a node's set-up and report (nodes.runtime) -----------------------------------------------
def attach_compression(ctx: Any, config: dict[str, Any]) -> None:
    """From a node's config: the run's cut codec (`compression`, every node of the run) and
    this client's own low-precision or pruned training (`client_weights`: bits, prune)."""
    codec = make_codec(config.get("compression"), seed=int(config.get("seed", 0)))
    if codec is not None:
        ctx.cut = CutCodec(codec)
    own = config.get("client_weights")
    if own:
        unknown = sorted(set(own) - {"bits", "prune"})
        if unknown:
            raise CompressionError(f"client_weights: unknown field(s) {unknown}; valid: "
                                   f"['bits', 'prune']")
        ctx.wquant = WeightQuantizer(list(ctx.segments.values()), **own)


def compression_report(ctx: Any) -> None:
    """This round's codec bytes (dense vs packed tensor frames) and the client weights' state."""
    if ctx.cut is not None:
        ctx.extra["cut_codec"] = {"method": ctx.cut.codec.method, "raw_bytes": ctx.cut.raw_bytes,
                                  "wire_bytes": ctx.cut.wire_bytes}
        ctx.cut.raw_bytes = ctx.cut.wire_bytes = 0
    if ctx.wquant is not None:  # before the checkpoint: what the device holds is low-precision
        ctx.wquant.sync()
        ctx.extra["client_weights"] = ctx.wquant.stats()
