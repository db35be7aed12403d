"""benchmarks/fig4.py prices every scheme's round on the seed's network by its latency model
(70 MHz shared by the clients, 0.1-0.5 GHz clients, a 7 GHz server), and its Mininet variant
runs on links with the seed's per-client rates with the devices' speeds modelled."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.plan.latency import Profile, path_gain, psl_epsl, sfl_aggregation, sflv1, shannon_rate

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fig4", ROOT / "benchmarks" / "fig4.py")
fig4 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fig4)


@pytest.fixture(scope="module")
def profile() -> Profile:
    return Profile.of("resnet18", fig4.DATASET)


def args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"clients": 5, "batch": 16, "eta": 1.0, "cut": "layer1.1",
                                 "train_limit": 6000, **kw})


def test_the_seed_setup_is_the_latency_specs_worked_example():
    s = fig4.seed_setup(5, 16, 1.0)
    assert [c.f for c in s.clients] == pytest.approx([0.1e9, 0.2e9, 0.3e9, 0.4e9, 0.5e9])
    for c, d in zip(s.clients, (50, 100, 150, 200, 250), strict=True):  # 14 MHz each way
        assert c.up.rate_bps == pytest.approx(shannon_rate(14e6, 0.2, path_gain(d)))
        assert c.down.rate_bps == pytest.approx(shannon_rate(14e6, 1.0, path_gain(d)))
    assert s.bcast.rate_bps == pytest.approx(shannon_rate(70e6, 1.0, path_gain(250)))
    assert s.f_server == 7e9 and s.batch == 16


def test_a_round_is_an_epoch_of_iterations_priced_by_the_schemes_model(profile):
    a = args()
    s, cut, iters = fig4.seed_setup(5, 16, 1.0), profile.cut("layer1.1"), 6000 / 5 / 16
    psl = fig4.modelled_round_s("psl", {}, a, profile)
    assert psl == pytest.approx(iters * psl_epsl(profile, s, cut)["total"])
    epsl = fig4.modelled_round_s("epsl", {"phi": 1.0}, a, profile)
    assert epsl == pytest.approx(iters * psl_epsl(profile, s, cut, phi=1.0)["total"])
    assert epsl < psl
    v1 = fig4.modelled_round_s("sflv1", {}, a, profile)  # FedAvg once a round on top
    assert v1 == pytest.approx(iters * sflv1(profile, s, cut)["total"]
                               + sfl_aggregation(profile, s, cut))
    assert fig4.modelled_round_s("fl", {}, a, profile) is None  # FL has no split model


@pytest.mark.net
def test_the_mininet_variant_trains_on_the_seed_links_at_the_modelled_speeds(tmp_path,
                                                                             no_leaks):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fig4.py"), "--quick",
                          "--network", "mininet", "--modelled-compute", "--eta", "50",
                          "--schemes", "PSL", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((tmp_path / "fig4-quick-mininet.json").read_text())
    assert "measured latency to target" in (tmp_path / "fig4-quick-mininet.md").read_text()
    (run,) = got["results"]["PSL"].values()
    assert len(run["acc"]) == len(run["round_s"]) == 2
    # the slowest client (0.1 GHz at 50 FLOPs/cycle) computes one full iteration (a 10-sample
    # epoch) forward and backward each round: no round can be shorter than that
    profile = Profile.of("resnet18", fig4.DATASET)
    slowest = 10 * 3 * profile.flops(0, profile.cut("layer1.1")) / (50 * 0.1e9)
    assert min(run["round_s"]) >= slowest > 1.0
