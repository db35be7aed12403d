"""Scheme math in one process, no network: EPSL's server update against a plain PSL step
(algorithms.md 14.1-14.3), FedAvg and weight packing, placement and option checks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nodes.context import NodeContext
from nodes.models import build_model, split_model
from nodes.protocol import Message
from nodes.schemes import get_scheme
from nodes.schemes.epsl import representative_seed
from nodes.schemes.weights import fedavg, pack, unpack

N, B = 3, 8


class FakeRouter:
    """Records what a server sends instead of sending it."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, dict]] = []

    def send(self, type: str, *, to: str, tensors: dict, **_: object) -> int:
        self.sent.append((type, to, {k: v.clone() for k, v in tensors.items()}))
        return sum(t.numel() * t.element_size() for t in tensors.values())


def server_ctx(seed: int = 0) -> NodeContext:
    segs = split_model(build_model("smallcnn", in_channels=1, image_size=8, num_classes=10,
                                   seed=seed), ["conv2"])
    opt = torch.optim.SGD(segs[1].parameters(), lr=0.1, momentum=0.9)
    return NodeContext(name="srv", role="server", run="t", segments={1: segs[1]},
                       optimizers={1: opt}, roles={"client": [f"c{i}" for i in range(N)]},
                       router=FakeRouter(), num_segments=2)


def batch() -> list[tuple[str, Message]]:
    g = torch.Generator().manual_seed(1)
    return [(f"c{i}", Message("ACT", tensors={"act": torch.randn(B, 64, 2, 2, generator=g),
                                              "labels": torch.randint(0, 10, (B,), generator=g)}))
            for i in range(N)]


def epsl_step(ctx: NodeContext, **opts) -> None:
    scheme = get_scheme("epsl", **opts)
    model, optims = scheme.server_model(ctx)
    scheme.server_update(ctx, model, optims, batch(), 1, 0)


def test_epsl_phi_zero_server_update_equals_a_plain_psl_step():
    ref = server_ctx()
    model = ref.model()
    x = torch.cat([m.tensors["act"] for _, m in batch()]).requires_grad_()
    out = model(x).split(B)
    loss = torch.stack([F.cross_entropy(o, m.tensors["labels"])
                        for o, (_, m) in zip(out, batch(), strict=True)]).mean()
    loss.backward()
    ref.optimizers[1].step()
    ctx = server_ctx()
    epsl_step(ctx, phi=0.0)
    for (k, a), b in zip(ref.segments[1].state_dict().items(),
                         ctx.segments[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    sent = ctx.router.sent
    assert [t for t, _, _ in sent] == ["GRAD"] * N
    for i, (_, to, tensors) in enumerate(sent):
        assert to == f"c{i}"
        torch.testing.assert_close(tensors["grad"], x.grad[i * B:(i + 1) * B] * N,
                                   rtol=0, atol=1e-6)
    assert ctx.counters["server_bp_vectors"] == N * B


def test_epsl_phi_one_gives_every_client_the_same_b_rows_and_backprops_b_vectors():
    ctx = server_ctx()
    epsl_step(ctx, phi=1.0)
    sent = ctx.router.sent
    assert [t for t, _, _ in sent] == ["GRAD_BCAST"] * N
    rows = [tensors["grad"] for _, _, tensors in sent]
    assert all(torch.equal(r, rows[0]) for r in rows) and len(rows[0]) == B
    assert ctx.counters["server_bp_vectors"] == B == ctx.counters["grad_rows_down"]


def test_epsl_backprops_b_times_phi_plus_n_times_one_minus_phi_vectors():
    ctx = server_ctx()
    epsl_step(ctx, phi=0.5)  # 4 shared rows + N x 4 own rows
    assert ctx.counters["server_bp_vectors"] == ctx.counters["grad_rows_down"] == 16
    assert [t for t, _, _ in ctx.router.sent] == ["GRAD_BCAST"] * N + ["GRAD"] * N
    assert all(len(g["grad"]) == 4 for _, _, g in ctx.router.sent)


def test_epsl_subset_backprop_updates_the_server_as_the_masked_one():
    masked, subset = server_ctx(), server_ctx()
    epsl_step(masked, phi=0.5)
    epsl_step(subset, phi=0.5, epsl_bp_compute="subset")
    for a, b in zip(masked.segments[1].state_dict().values(),
                    subset.segments[1].state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (t1, _, g1), (t2, _, g2) in zip(masked.router.sent, subset.router.sent, strict=True):
        assert t1 == t2
        torch.testing.assert_close(g1["grad"], g2["grad"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k_a", [0, 3, 8])
def test_representative_seed_keeps_the_sum_over_clients_of_every_position(k_a):
    G = torch.randn(N, B, 10, generator=torch.Generator().manual_seed(2))
    seed = representative_seed(G, k_a)
    torch.testing.assert_close(seed.sum(0), G.sum(0))           # oracle 14.3
    assert torch.equal(seed[:, k_a:], G[:, k_a:])                 # unaggregated rows as is
    nonzero = (seed[:, :k_a].abs().sum(-1) != 0).sum(0)
    assert torch.all(nonzero == 1)                                # one vector per position


def test_fedavg_is_the_data_weighted_mean_and_rounds_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(6)}
    avg = fedavg([a, b], [1.0, 2.0])
    torch.testing.assert_close(avg["w"], torch.tensor([3.0, 6.0]))
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 5


def test_packed_weights_and_optimizer_state_load_into_another_node():
    def ctx_of(seed: int) -> NodeContext:
        seg = split_model(build_model("resnet18", in_channels=1, image_size=8, seed=seed),
                          ["layer1.0"])[0]
        opt = torch.optim.SGD(seg.parameters(), lr=0.1, momentum=0.9)
        return NodeContext(name="n", role="client", run="t", segments={0: seg},
                           optimizers={0: opt}, roles={})

    src, dst = ctx_of(1), ctx_of(2)
    src.segments[0](torch.randn(4, 1, 8, 8)).sum().backward()
    src.step()  # creates momentum buffers; BN running stats moved in the forward
    unpack(dst, pack(src, [0], optimizer=True), [0])
    for (k, a), b in zip(src.segments[0].state_dict().items(),
                         dst.segments[0].state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    s_state, d_state = (c.optimizers[0].state for c in (src, dst))
    for p_src, p_dst in zip(src.segments[0].parameters(), dst.segments[0].parameters(),
                            strict=True):
        assert torch.equal(s_state[p_src]["momentum_buffer"], d_state[p_dst]["momentum_buffer"])
    params_only = pack(src, [0], buffers=False)
    assert not any("running_mean" in k for k in params_only)


def test_u_shaped_placement_keeps_first_and_last_segments_on_clients():
    roles = {"client": ["c1", "c2"], "server": ["srv"], "fedserver": ["fed"]}
    for name in ("sl", "psl", "epsl", "sflv1", "sflv2"):
        scheme = get_scheme(name, u_shaped=True)
        place = scheme.placement(3, roles)
        assert place["c1"] == place["c2"] == [0, 2]
        assert 1 in place["srv"] and scheme.model_of("c1", place, 3)[1] == ("srv", 1)
        assert scheme.model_of("c1", place, 3)[0][1] == 0
        with pytest.raises(ValueError, match="two cuts"):
            scheme.placement(2, roles)


def test_scheme_options_are_checked_by_name_type_and_listed_choice():
    with pytest.raises(ValueError, match="unknown option"):
        get_scheme("psl", phi=0.5)
    with pytest.raises(ValueError, match="valid"):
        get_scheme("sl", handoff="carrier-pigeon")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_scheme("epsl", phi=1.5)
    with pytest.raises(ValueError, match="must be a bool"):
        get_scheme("psl", u_shaped="yes")
    assert get_scheme("epsl", phi=1).opts["phi"] == 1


def test_server_copies_average_back_with_data_weights():
    ctx = server_ctx()
    scheme = get_scheme("sflv1")
    copies = scheme.server_copies(ctx)
    before = copy.deepcopy(ctx.segments[1].state_dict())
    with torch.no_grad():
        for i, m in enumerate(copies.models.values()):
            for p in m.parameters():
                p.add_(float(i))
    copies.average_into(ctx, {"c0": 1.0, "c1": 1.0, "c2": 2.0})  # mean shift (0+1+4)/4
    for k, v in ctx.segments[1].state_dict().items():
        torch.testing.assert_close(v, before[k] + 1.25)
