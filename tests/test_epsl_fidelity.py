"""EPSL's promises, for every way of back-propagating the aggregated rows (epsl_bp_mode):
phi=0 is PSL bit for bit; phi=1 back-propagates b rows per step and sends b shared rows,
whatever the number of clients N (in one process, and on the loopback network for N=2 and
N=4); the variants are what docs/schemes.md says they are."""

from __future__ import annotations

import pytest
import torch

from nodes.context import NodeContext
from nodes.models import build_model, split_model
from nodes.protocol import Message
from nodes.schemes import get_scheme
from nodes.schemes.epsl import BP_MODES
from tests.test_schemes_loopback import loop_run
from tests.test_schemes_math import FakeRouter

B = 8
O1 = [m for m in BP_MODES if m != "cutlayer_average"]  # the ones with O(1) server BP


def server_ctx(n: int) -> NodeContext:
    segs = split_model(build_model("smallcnn", in_channels=1, image_size=8, num_classes=10,
                                   seed=0), ["conv2"])
    opt = torch.optim.SGD(segs[1].parameters(), lr=0.1, momentum=0.9)
    return NodeContext(name="srv", role="server", run="t", segments={1: segs[1]},
                       optimizers={1: opt}, roles={"client": [f"c{i}" for i in range(n)]},
                       router=FakeRouter(), num_segments=2)


def batch(n: int, same: bool = False) -> list[tuple[str, Message]]:
    g = torch.Generator().manual_seed(1)
    act, labels = torch.randn(B, 64, 2, 2, generator=g), torch.randint(0, 10, (B,), generator=g)
    out = []
    for i in range(n):
        if not same:
            act, labels = (torch.randn(B, 64, 2, 2, generator=g),
                           torch.randint(0, 10, (B,), generator=g))
        out.append((f"c{i}", Message("ACT", tensors={"act": act, "labels": labels})))
    return out


def step(name: str, n: int, same: bool = False, steps: int = 1, **opts) -> NodeContext:
    ctx = server_ctx(n)
    scheme = get_scheme(name, **opts)
    model, optims = scheme.server_model(ctx)
    for s in range(steps):
        scheme.server_update(ctx, model, optims, batch(n, same), 1, s)
    return ctx


def states_equal(a: NodeContext, b: NodeContext) -> bool:
    sa, sb = a.segments[1].state_dict(), b.segments[1].state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("mode", BP_MODES)
def test_phi_zero_is_psl_bit_for_bit(mode):
    psl = step("psl", 3, steps=3)
    epsl = step("epsl", 3, steps=3, phi=0.0, epsl_bp_mode=mode)
    assert states_equal(psl, epsl)
    assert [(t, to) for t, to, _ in psl.router.sent] == [(t, to) for t, to, _ in epsl.router.sent]
    for (_, _, a), (_, _, b) in zip(psl.router.sent, epsl.router.sent, strict=True):
        assert torch.equal(a["grad"], b["grad"])
    assert psl.counters == epsl.counters


@pytest.mark.parametrize("n", [2, 4, 7])
@pytest.mark.parametrize("mode", O1)
def test_phi_one_backprops_and_sends_b_rows_whatever_n(mode, n):
    ctx = step("epsl", n, steps=2, phi=1.0, epsl_bp_mode=mode)
    assert ctx.counters["server_bp_vectors"] == 2 * B                   # b per step
    assert ctx.counters["grad_rows_down"] == 2 * B                      # one broadcast of b
    sent = ctx.router.sent
    assert [t for t, _, _ in sent] == ["GRAD_BCAST"] * (2 * n)
    assert all(torch.equal(g["grad"], sent[0][2]["grad"]) for _, _, g in sent[:n])


def test_cutlayer_average_backprops_every_row_but_sends_b():
    ctx = step("epsl", 4, phi=1.0, epsl_bp_mode="cutlayer_average")
    assert ctx.counters["server_bp_vectors"] == 4 * B and ctx.counters["grad_rows_down"] == B


@pytest.mark.parametrize("base", ["representative", "mean_activation"])
def test_unbiased_sends_n_times_the_sum_variant(base):
    n = 4
    plain = step("epsl", n, phi=1.0, epsl_bp_mode=base)
    scaled = step("epsl", n, phi=1.0, epsl_bp_mode=f"{base}_unbiased")
    torch.testing.assert_close(scaled.router.sent[0][2]["grad"],
                               plain.router.sent[0][2]["grad"] * n, rtol=1e-5, atol=1e-7)
    assert not states_equal(plain, scaled)  # the server's step is N times larger too


@pytest.mark.parametrize("phi", [0.5, 1.0])
def test_last_layer_unbiased_scales_only_the_shared_rows(phi):
    """The server steps as in last_layer; each client gets N times last_layer's shared row
    (the sum over clients instead of their mean) and its own rows unchanged."""
    n = 4
    plain = step("epsl", n, phi=phi, epsl_bp_mode="last_layer")
    scaled = step("epsl", n, phi=phi, epsl_bp_mode="last_layer_unbiased")
    assert states_equal(plain, scaled)
    for (ta, _, a), (tb, _, b) in zip(plain.router.sent, scaled.router.sent, strict=True):
        assert ta == tb
        torch.testing.assert_close(b["grad"], a["grad"] * (n if ta == "GRAD_BCAST" else 1),
                                   rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("phi", [0.5, 1.0])
def test_mean_activation_equals_representative_when_clients_send_the_same(phi):
    """With identical activations and labels everywhere the mean is any client's, so the
    two constructions coincide."""
    rep = step("epsl", 3, same=True, phi=phi, epsl_bp_mode="representative")
    mean = step("epsl", 3, same=True, phi=phi, epsl_bp_mode="mean_activation")
    for a, b in zip(rep.segments[1].state_dict().values(),
                    mean.segments[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for (_, _, a), (_, _, b) in zip(rep.router.sent, mean.router.sent, strict=True):
        torch.testing.assert_close(a["grad"], b["grad"], rtol=1e-5, atol=1e-7)


def test_mean_activation_differs_from_representative_on_different_clients():
    rep = step("epsl", 3, phi=1.0, epsl_bp_mode="representative")
    mean = step("epsl", 3, phi=1.0, epsl_bp_mode="mean_activation")
    assert not states_equal(rep, mean)


ITERS, BATCH = 3, 8


@pytest.mark.parametrize("n", [2, 4])
def test_loopback_phi_one_counts_b_rows_per_step_whatever_n(tmp_path, n):
    _, rounds = loop_run(tmp_path, "epsl", {"clients": n}, rounds=1, iters_per_round=ITERS,
                         batch_size=BATCH, scheme_options={"phi": 1.0})
    (rec,) = rounds
    srv = rec["nodes"]["srv"]
    assert srv["counters"]["server_bp_vectors"] == ITERS * BATCH
    assert srv["counters"]["grad_rows_down"] == ITERS * BATCH
    assert srv["by_type"]["GRAD_BCAST.tx_msgs"] == ITERS * n
    assert srv["by_type"].get("GRAD.tx_msgs", 0) == 0
