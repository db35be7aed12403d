"""Cut codecs and client weight quantization (nodes.compression), pure logic: algorithms.md
14.8-14.9 oracles (C3-SL equals the direct definition, payload B/R rows, fidelity 1/sqrt(1+R),
gradient shapes; top-k and quantization bit counts and error bounds), the gradient each codec
hands the client against autograd, real protocol frames, and the errors that name the field."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nodes.compression import (
    C3SL,
    CompressionError,
    CutCodec,
    Quant,
    TopK,
    WeightQuantizer,
    make_codec,
    pack_bits,
    unpack_bits,
)
from nodes.protocol import Message, decode, encode


def roundtrip(codec, a: torch.Tensor, g: torch.Tensor):
    """Client packs `a`, the frames cross the real wire encoding, the server unpacks, returns
    `g` for its dense activation, the client unpacks: (server's act, client's grad, ACT bytes,
    GRAD bytes, ACT frames)."""
    client, server = CutCodec(codec), CutCodec(codec)
    t, m = client.pack_act("ACT", "c1", 1, 0, a, {"labels": torch.zeros(len(a), dtype=torch.long)})
    act_frames = encode(Message("ACT", round=1, step=0, tensors=t, meta=m))
    msg = decode(act_frames)
    server.unpack("c1", msg)
    t2, m2 = server.pack_grad("GRAD", "c1", 1, 0, g)
    grad_frames = encode(Message("GRAD", round=1, step=0, tensors=t2, meta=m2))
    back = decode(grad_frames)
    client.unpack("c1", back)
    nbytes = [sum(len(f) for f in fr[1:]) for fr in (act_frames, grad_frames)]
    return msg.tensors["act"], back.tensors["grad"], nbytes[0], nbytes[1], t


def direct_conv(k, z):
    d = len(z)
    return torch.stack([sum(k[m] * z[(n - m) % d] for m in range(d)) for n in range(d)])


def direct_corr(k, v):
    d = len(v)
    return torch.stack([sum(k[m] * v[(n + m) % d] for m in range(d)) for n in range(d)])


def test_c3sl_fft_equals_direct_definition():
    c, d = C3SL(R=3, seed=5), 12
    z = torch.randn(6, d, dtype=torch.float32)
    k = c.keys(d)
    assert torch.allclose(k.norm(dim=1), torch.ones(3), atol=1e-6)
    v = c.encode(z)
    assert v.shape == (2, d)  # payload: exactly B/R rows of d
    for g in range(2):
        ref = sum(direct_conv(k[r], z[3 * g + r]) for r in range(3))
        assert torch.allclose(v[g], ref, atol=1e-5)
    zh = c.decode(v)
    for i in range(6):
        assert torch.allclose(zh[i], direct_corr(k[i % 3], v[i // 3]), atol=1e-5)


@pytest.mark.parametrize("R", [1, 4, 16])
def test_c3sl_fidelity_is_statistical(R):
    c = C3SL(R=R, seed=1)
    z = torch.randn(16 * 8, 4096)
    cos = F.cosine_similarity(z, c.decode(c.encode(z))).mean().item()
    assert abs(cos - 1 / math.sqrt(1 + R)) < 0.05


def test_c3sl_wire_and_gradient_are_the_autograd_of_encode_then_decode():
    c = C3SL(R=4, seed=2)
    a = torch.relu(torch.randn(8, 16, 2, 2))
    w = torch.randn(8, 16, 2, 2)  # the server's loss: <w, z_hat>
    dense, grad, act_bytes, grad_bytes, frames = roundtrip(c, a, w)
    assert frames["act.c3"].shape == (2, 64) and dense.shape == a.shape
    assert act_bytes == 2 * 64 * 4 + 8 * 8 and grad_bytes == 2 * 64 * 4  # labels are int64
    z = a.clone().requires_grad_()
    (c.decode(c.encode(z.reshape(8, -1))).reshape(a.shape) * w).sum().backward()
    assert torch.allclose(grad, z.grad, atol=1e-5)
    with pytest.raises(CompressionError, match="multiple of R=4"):
        c.encode(torch.randn(6, 64))


def test_topk_keeps_largest_and_gradient_only_at_kept_positions():
    codec = TopK(rho=0.05)
    a = torch.randn(4, 8, 8, 8)  # d = 512, k = 26: indices (int16) beat a 512-bit mask
    g = torch.randn_like(a)
    dense, grad, act_bytes, grad_bytes, frames = roundtrip(codec, a, g)
    k = math.ceil(0.05 * 512)
    assert frames["act.v"].shape == (4, k) and frames["act.i"].dtype == torch.int16
    assert act_bytes == 4 * k * (4 + 2) + 4 * 8 and grad_bytes == 4 * k * 4
    flat, dflat = a.reshape(4, -1), dense.reshape(4, -1)
    kept = dflat != 0
    assert (kept.sum(1) == k).all()
    assert torch.equal(dflat[kept], flat[kept])
    assert (flat.abs()[~kept].reshape(4, -1).max(1).values
            <= flat.abs()[kept].reshape(4, -1).min(1).values).all()
    assert torch.equal(grad.reshape(4, -1)[kept], g.reshape(4, -1)[kept])
    assert (grad.reshape(4, -1)[~kept] == 0).all()
    # a large keep ratio: a d-bit mask is smaller than the indices
    _, _, mask_bytes, _, frames = roundtrip(TopK(rho=0.5), a, g)
    assert "act.m" in frames and mask_bytes == 4 * 256 * 4 + 4 * 512 // 8 + 4 * 8


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quant_error_bound_and_bit_counts(bits):
    codec = Quant(bits=bits)
    a = torch.relu(torch.randn(8, 32, 2, 2))
    g = torch.randn_like(a)
    dense, grad, act_bytes, grad_bytes, _ = roundtrip(codec, a, g)
    n = a.numel()
    assert act_bytes == n * bits // 8 + 2 * 4 + 8 * 8  # n*b bits + scale and offset + labels
    assert grad_bytes == n * bits // 8 + 4
    s = (a.max() - a.min()) / (2 ** bits - 1)
    assert (dense - a).abs().max() <= s / 2 + 1e-6
    sg = g.abs().max() / (2 ** (bits - 1) - 1)
    assert (grad - g).abs().max() <= sg / 2 + 1e-6  # straight-through: the dequantized grad


def test_quant_per_sample_and_fp16():
    a = torch.randn(4, 10) * torch.tensor([1.0, 10.0, 100.0, 1000.0])[:, None]
    d, _, _, _, _ = roundtrip(Quant(bits=8, qgroup="sample"), a, a)
    s = (a.max(1).values - a.min(1).values) / 255
    assert ((d - a).abs() <= s[:, None] / 2 + 1e-4).all()
    _, _, nbytes, _, frames = roundtrip(Quant(bits=16), a, a)
    assert frames["act.h"].dtype == torch.float16 and nbytes == 4 * 10 * 2 + 4 * 8


def test_bit_packing_roundtrip():
    for bits in (1, 2, 4, 8):
        q = torch.randint(0, 2 ** bits, (37,))
        p = pack_bits(q, bits)
        assert len(p) == math.ceil(37 * bits / 8)
        assert torch.equal(unpack_bits(p, bits, 37), q)


def test_weight_quantizer_levels_and_training():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    wq = WeightQuantizer([model], bits=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(64, 20), torch.randint(0, 3, (64,))
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        wq.before_step()
        opt.step()
        wq.after_step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(n <= 2 ** 4 for n in wq.stats()["levels"])
    assert not torch.equal(wq.master[0], model[0].weight)  # fp32 master, int-4 weights
    pruned = WeightQuantizer([model], prune=0.5)
    assert all(f >= 0.5 for f in pruned.stats()["zero_fraction"])
    # weights loaded from outside (an SL hand-off, SFL's W_DOWN) become the fp32 masters
    handed = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(handed)
    pruned.before_step()
    assert torch.equal(pruned.master[0], handed["0.weight"])
    model.load_state_dict(handed)  # e.g. SFL's W_DOWN average at the end of a round
    wq.sync()  # before the checkpoint: low-precision again, the average as the master
    assert all(n <= 2 ** 4 for n in wq.stats()["levels"])
    assert torch.equal(wq.master[0], handed["0.weight"])


def test_errors_name_the_field():
    with pytest.raises(CompressionError, match="'method'"):
        make_codec({"method": "zip"})
    with pytest.raises(CompressionError, match="'R'"):
        make_codec({"method": "c3sl", "R": 0})
    with pytest.raises(CompressionError, match="unknown field"):
        make_codec({"method": "topk", "R": 4})
    with pytest.raises(CompressionError, match="'bits'"):
        make_codec({"method": "quant", "bits": 3})
    with pytest.raises(CompressionError, match="no compressed activation"):
        CutCodec(C3SL(4)).pack_grad("GRAD", "c1", 1, 0, torch.zeros(4, 4))
    c = CutCodec(C3SL(4))
    t, m = c.pack_act("ACT", "c1", 1, 0, torch.randn(8, 16))
    bad = Message("ACT", round=1, step=0, tensors={"act.c3": t["act.c3"][:1]}, meta=m)
    with pytest.raises(CompressionError, match="act.c3"):
        CutCodec(C3SL(4)).unpack("c1", bad)
    assert make_codec({}) is None and make_codec({"method": "none"}) is None
