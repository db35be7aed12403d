"""Seed Fig. 6 (benchmarks/fig6.py): the analytic latency of algorithms.md 11.7 for the three
splits, and the emulated runs against it."""

from __future__ import annotations

import argparse
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("fig6", os.path.join(ROOT, "benchmarks", "fig6.py"))
fig6 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fig6)
MAKE = fig6.topology(users=3, cec_ratio=1 / 20)


def latency(split: str, **kw) -> dict[str, float]:
    args = {"model": "smallcnn", "dataset": "digits", "l1": "conv1", "l2": "conv2", "batch": 16,
            "eta": 1.0, **kw}
    return fig6.analytic(MAKE(fig6.SPLITS[split][0]), split, **args)


def test_each_split_pays_for_the_tiers_it_uses():
    ue, uc, uec = latency("user-edge"), latency("user-cloud"), latency("user-edge-cloud")
    assert ue["edge_cloud"] == ue["cloud"] == 0 < ue["edge"]
    assert uc["edge"] == 0 < uc["cloud"]
    assert min(uec["edge"], uec["edge_cloud"], uec["cloud"]) > 0
    # conv1's output is twice conv2's: the user-cloud split ships more over the slow link.
    assert uc["edge_cloud"] > 1.5 * uec["edge_cloud"]
    assert ue["users"] == uc["users"] == uec["users"]
    assert all(t["total"] == pytest.approx(sum(v for k, v in t.items() if k != "total"))
               for t in (ue, uc, uec))


def test_more_flops_per_cycle_shortens_only_compute():
    slow, fast = latency("user-edge-cloud"), latency("user-edge-cloud", eta=16.0)
    assert fast["edge"] == pytest.approx(slow["edge"] / 16)
    assert fast["cloud"] == pytest.approx(slow["cloud"] / 16)
    assert fast["edge_cloud"] == slow["edge_cloud"]


@pytest.mark.net
def test_emulated_splits_rank_as_the_model_predicts(tmp_path):
    a = argparse.Namespace(dataset="digits", model="smallcnn", batch=16, l1="conv1",
                           l2="conv2", eta=1.0)
    measured, model = {}, {}
    for split in fig6.SPLITS:
        got = fig6.measure(MAKE(fig6.SPLITS[split][0]), split, 240, a, str(tmp_path))
        measured[split] = got["measured_s"]
        model[split] = got["iters"] * latency(split)["total"]
        assert 0.7 < measured[split] / model[split] < 2.0, (split, measured, model)
    assert sorted(measured, key=measured.get) == sorted(model, key=model.get), (measured, model)
