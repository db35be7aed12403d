"""PSL, SFL-V1 and SFL-V2 against an independent single-process reference written here in
plain torch, bit for bit, for three rounds on the loopback network (no Mininet).

The reference follows the SplitFed reference code's optimizer semantics: a fresh client
optimizer every round and a fresh server optimizer every batch, which the schemes offer as
client_optimizer_reset=round and server_optimizer_reset=batch; and a round is one pass over
each client's shard with the last partial batch kept (epoch_rounds=true). Only the inputs
come from the package: the data set and its IID partition, and the initial model and its
split; the training itself (who computes what, in which order, which gradient goes where,
FedAvg) is written out below. The shards (100 samples, batches of 16) end in a partial batch.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from nodes.data import dataset_info, load_dataset, partition
from nodes.models import build_model, split_model
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from tests.test_schemes_loopback import TINY, free_ports, same

N, ROUNDS, BATCH, LIMIT, SEED, LR, MOM = 3, 3, 16, 300, 0, 0.05, 0.9
CUT = "conv2"
REFERENCE = {"client_optimizer_reset": "round", "server_optimizer_reset": "batch",
             "epoch_rounds": True}


def sgd(module: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=LR, momentum=MOM)


class Setup:
    """The inputs: shards, per-client shuffles, the initial client and server segments."""

    def __init__(self) -> None:
        info = dataset_info("digits")
        train = load_dataset("digits", "train", limit=LIMIT, seed=SEED)
        self.shards = [train.subset(s) for s in partition(train.y, N, seed=SEED)]
        model = build_model("smallcnn", num_classes=info["num_classes"],
                            in_channels=info["in_channels"], image_size=info["image_size"],
                            seed=SEED)
        head, tail = split_model(model, [CUT])
        self.clients = [copy.deepcopy(head) for _ in range(N)]
        self.server = tail
        self.gens = [torch.Generator().manual_seed(SEED * 1000 + i) for i in range(N)]

    def epoch(self, i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Client i's batches of one round: one pass over a fresh shuffle, tail kept."""
        d = self.shards[i]
        order = torch.randperm(len(d), generator=self.gens[i])
        return [(d.x[idx], d.y[idx]) for idx in order.split(BATCH)]


def fedavg(models: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Equal-weight mean (the shards are equal), accumulated in float64."""
    states = [m.state_dict() for m in models]
    return {k: sum(s[k].double() * (1 / len(states)) for s in states).to(states[0][k].dtype)
            for k in states[0]}


def server_step(server: torch.nn.Module, acts: list[torch.Tensor],
                labels: list[torch.Tensor]) -> torch.Tensor:
    """One server update on the clients' activations stacked (fresh optimizer): the mean of
    the per-client mean losses; returns d loss / d activations."""
    x = torch.cat([a.detach() for a in acts]).requires_grad_()
    out = server(x).split([len(a) for a in acts])
    opt = sgd(server)
    opt.zero_grad(set_to_none=True)
    torch.stack([F.cross_entropy(o, y) for o, y in zip(out, labels, strict=True)]).mean() \
        .backward()
    opt.step()
    return x.grad


def reference(scheme: str) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each node runs: a kernel's summation order depends on it
    try:
        return _reference(scheme)
    finally:
        torch.set_num_threads(threads)


def _reference(scheme: str) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    s = Setup()
    for rnd in range(1, ROUNDS + 1):
        copts = [sgd(c) for c in s.clients]  # fresh client optimizers every round
        batches = [s.epoch(i) for i in range(N)]
        if scheme == "psl":  # all clients' step k in one server batch
            for k in range(len(batches[0])):
                acts = []
                for i in range(N):
                    copts[i].zero_grad(set_to_none=True)
                    acts.append(s.clients[i](batches[i][k][0]))
                g = server_step(s.server, acts, [batches[i][k][1] for i in range(N)])
                for i, rows in enumerate(g.split([len(a) for a in acts])):
                    acts[i].backward(rows * N)  # each client's own mean-loss gradient
                    copts[i].step()
            continue
        if scheme == "sflv1":  # a server copy per client, averaged after the round
            copies = [copy.deepcopy(s.server) for _ in range(N)]
            order = list(range(N))  # copies are independent: any order gives the same
        else:  # sflv2, random_per_round: one server, the clients' rounds one after another
            copies = [s.server] * N
            gen = torch.Generator().manual_seed(SEED * 1_000_003 + rnd)
            order = torch.randperm(N, generator=gen).tolist()
        for i in order:
            for x, y in batches[i]:
                copts[i].zero_grad(set_to_none=True)
                act = s.clients[i](x)
                act.backward(server_step(copies[i], [act], [y]))
                copts[i].step()
        if scheme == "sflv1":
            s.server.load_state_dict(fedavg(copies))
        avg = fedavg(s.clients)
        for c in s.clients:
            c.load_state_dict(avg)
    out = {f"c{i + 1}": {0: c.state_dict()} for i, c in enumerate(s.clients)}
    out["srv"] = {1: s.server.state_dict()}
    return out


def run(tmp_path, scheme: str, **options) -> dict[str, dict[int, dict[str, torch.Tensor]]]:
    topo, _ = load_topology(TINY, params={"clients": N, "fed": scheme.startswith("sfl")})
    options = {**REFERENCE, **options}
    if scheme == "fl":  # no server optimizer
        options.pop("server_optimizer_reset")
    cfg = dict(name=scheme, scheme=scheme, dataset="digits", rounds=ROUNDS, batch_size=BATCH,
               lr=LR, momentum=MOM, train_limit=LIMIT, test_limit=100, seed=SEED,
               out_dir=str(tmp_path), port=free_ports(), cuts=[CUT],
               scheme_options=options)
    exp = Experiment(RunConfig.from_dict(cfg), topo, topology=TINY, loopback=True)
    exp.run()
    return {n: torch.load(c["checkpoint"], weights_only=True)["segments"]
            for n, c in exp.node_configs.items() if n != "fed"}


@pytest.mark.parametrize("scheme,options", [("psl", {}), ("sflv1", {}),
                                            ("sflv2", {"v2_order": "random_per_round"})])
def test_scheme_matches_the_plain_torch_reference_bit_for_bit(tmp_path, scheme, options):
    got, want = run(tmp_path, scheme, **options), reference(scheme)
    assert got.keys() == want.keys()
    for node, segs in want.items():
        for seg, state in segs.items():
            assert same(got[node][seg], state), (node, seg)


def test_the_reference_tells_the_optimizer_semantics_apart():
    """The reference is sensitive to what the options change: persistent momentum (the
    schemes' default) trains differently, so the match above is not vacuous."""
    s = Setup()
    x, y = s.epoch(0)[0]
    a, b = copy.deepcopy(s.server), copy.deepcopy(s.server)
    opt = sgd(b)
    act = s.clients[0](x)
    for _ in range(2):
        server_step(a, [act], [y])  # fresh optimizer each batch
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(b(act.detach()), y).backward()
        opt.step()  # momentum carried over
    assert not same(a.state_dict(), b.state_dict())


def test_sflv1_and_fl_train_the_same_weights_bit_for_bit(tmp_path):
    """docs/schemes.md: with persistent optimizers and equal FedAvg weights, SFL-V1's client
    head and server copy are the whole model FL's client trains, averaged the same way."""
    sfl = run(tmp_path / "sfl", "sflv1", client_optimizer_reset="never",
              server_optimizer_reset="never")
    fl = run(tmp_path / "fl", "fl", client_optimizer_reset="never")
    for c in (f"c{i + 1}" for i in range(N)):
        assert same(sfl[c][0], fl[c][0]), c
        assert same(sfl["srv"][1], fl[c][1]), c
