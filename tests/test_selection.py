"""Client selection logic (nodes.selection), algorithms.md 14.10: Power-of-Choice picks the
highest-loss candidates, d = m reduces to random selection, the candidate draw follows the shard
sizes (chi-squared), the deadline filter, and the node side (take_part)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from nodes.selection import SelectionError, Selector, take_part

CLIENTS = [f"c{i}" for i in range(1, 7)]


def reports(losses: dict[str, float], compute: dict[str, float] | None = None) -> dict:
    return {c: {"last_loss": v, "compute_s": (compute or {}).get(c, 0.1)}
            for c, v in losses.items()}


def test_untried_clients_first_then_highest_losses():
    sel = Selector({"policy": "rpowd", "m": 2, "d": 6}, CLIENTS, seed=1)
    tried: set[str] = set()
    for _ in range(3):  # never-selected clients count as +inf loss: all tried in 3 rounds
        chosen, info = sel.choose()
        assert not tried & set(chosen) and info["chosen"] == chosen
        tried |= set(chosen)
        sel.observe(reports({c: 0.5 for c in chosen}))
    assert tried == set(CLIENTS)
    losses = {"c1": 0.3, "c2": 2.5, "c3": 0.1, "c4": 1.7, "c5": 0.9, "c6": 0.2}
    sel.observe(reports(losses))
    for _ in range(5):  # d = K: the candidates are everyone, the top-2 losses win
        assert sel.choose()[0] == ["c2", "c4"]
    sel3 = Selector({"policy": "rpowd", "m": 2, "d": 3}, CLIENTS, seed=2)
    sel3.observe(reports(losses))
    for _ in range(20):  # with fixed, distinct losses the selected set is the top-m of A
        chosen, info = sel3.choose()
        top = sorted(info["candidates"], key=lambda c: -losses[c])[:2]
        assert set(chosen) == set(top)


def test_d_equal_m_is_random_and_sampling_follows_shard_sizes():
    sizes = {c: s for c, s in zip(CLIENTS, [10, 10, 20, 20, 40, 100], strict=True)}
    sel = Selector({"policy": "rpowd", "m": 1, "d": 1}, CLIENTS, sizes, seed=3)
    sel.observe(reports({c: float(i) for i, c in enumerate(CLIENTS)}))  # c6: highest loss
    n = 4000
    counts = Counter(sel.choose()[0][0] for _ in range(n))
    p = torch.tensor([sizes[c] for c in CLIENTS], dtype=torch.float64)
    expected = n * p / p.sum()
    observed = torch.tensor([counts[c] for c in CLIENTS], dtype=torch.float64)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-squared, 5 degrees of freedom, p = 0.001


def test_deadline_excludes_slow_clients_and_combines_with_loss():
    sel = Selector({"policy": "rpowd", "m": 2, "d": 6, "deadline_s": 1.0}, CLIENTS)
    sel.observe(reports({c: 1.0 + i for i, c in enumerate(CLIENTS)},
                        {"c6": 5.0, "c5": 0.5, "c4": 3.0}))
    chosen, info = sel.choose()
    assert chosen == ["c3", "c5"] and "c6" not in info["eligible"]
    every = Selector({"policy": "all", "deadline_s": 1.0}, CLIENTS)
    every.observe(reports(dict.fromkeys(CLIENTS, 1.0), dict.fromkeys(CLIENTS, 9.0)))
    assert len(every.choose()[0]) == 1  # nobody fits: the fastest predicted one still runs


def test_bad_settings_name_the_field():
    for spec, field in (({"policy": "powd"}, "'policy'"), ({"m": 7}, "'m'"),
                        ({"m": 3, "d": 2}, "'d'"), ({"deadline_s": 0}, "'deadline_s'"),
                        ({"k": 1}, "unknown")):
        with pytest.raises(SelectionError, match=field):
            Selector(spec, CLIENTS)


def test_take_part_narrows_the_round_to_participants():
    ctx = SimpleNamespace(name="c2", role="client", roles={"client": ["c1", "c2", "c3"]},
                          extra={})
    assert not take_part(ctx, {"clients": ["c1", "c3"]}, ["c1", "c2", "c3"])
    assert ctx.roles["client"] == ["c1", "c3"] and ctx.extra["selected"] is False
    srv = SimpleNamespace(name="srv", role="server", roles={"client": []}, extra={})
    assert take_part(srv, {"clients": ["c3", "c1"]}, ["c1", "c2", "c3"])
    assert srv.roles["client"] == ["c1", "c3"]
    assert take_part(srv, {}, ["c1", "c2", "c3"]) and srv.roles["client"] == ["c1", "c2", "c3"]


def test_a_run_selects_per_round_and_only_participants_train(tmp_path):
    """Loopback run (real node processes, no Mininet): 3 clients, rpowd m=2 d=3. Each round's
    choice is logged, the one left out does no work, the server's batch holds only the
    participants, and from round 2 on the choice is the top-2 of the losses last reported."""
    from testbed import Experiment
    from testbed.emu.topology import load_topology
    from testbed.plan.config import RunConfig
    from testbed.run.records import read_rounds

    tiny = __file__.rsplit("/tests/", 1)[0] + "/topologies/tiny.py"
    topo, _ = load_topology(tiny, params={"clients": 3})
    iters, batch = 4, 16
    cfg = RunConfig.from_dict(dict(
        name="sel", dataset="digits", rounds=3, iters_per_round=iters, batch_size=batch,
        train_limit=None, evaluate=False, out_dir=str(tmp_path), port=20200,
        selection={"policy": "rpowd", "m": 2, "d": 3}))
    exp = Experiment(cfg, topo, topology=tiny, loopback=True)
    exp.run()
    rounds = read_rounds(exp.run_dir.path)
    last: dict[str, float] = {}
    for r in rounds:
        chosen = r["selection"]["chosen"]
        assert len(chosen) == 2
        if len(last) == 3:  # every client has reported a loss: the top-2 are chosen
            assert set(chosen) == set(sorted(last, key=lambda c: -last[c])[:2])
        for c in ("c1", "c2", "c3"):
            node = r["nodes"][c]
            assert node["selected"] == (c in chosen)
            assert node["samples"] == (iters * batch if c in chosen else 0)
            if c in chosen:
                last[c] = node["last_loss"]
        assert r["nodes"]["srv"]["counters"]["server_bp_vectors"] == 2 * iters * batch
