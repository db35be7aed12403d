"""Asynchronous SL over real Mininet hosts (topologies/tiny.py): with c2 held to 5 % of the CPU,
synchronous PSL waits for it every step, the event-driven server does not: the same number of
server updates takes less time, the fast client contributes more of them, and staleness is
measured per update, and each client's model is mixed into the global one (FedAsync) when it
stops (nodes/schemes/async_sl.py)."""

from __future__ import annotations

import os

import pytest

from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds

pytestmark = pytest.mark.net
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")
ITERS = 30  # enough steps for c2 to exhaust its 5 % quota period after period


def run(tmp_path, scheme: str, **opts):
    cfg = dict(name=scheme.replace("_", "-"), scheme=scheme, scheme_options=opts,
               dataset="digits", rounds=1, iters_per_round=ITERS, batch_size=32,
               train_limit=None, evaluate=False, launcher="zygote", cpu={"c2": 0.05},
               out_dir=str(tmp_path))
    topo, _ = load_topology(TINY)
    exp = Experiment(RunConfig.from_dict(cfg), topo, topology=TINY)
    exp.run()
    return read_rounds(exp.run_dir.path)[0]


@pytest.fixture(scope="module")
def straggler(tmp_path_factory):
    return {s: run(tmp_path_factory.mktemp(s), s, **o) for s, o in (
        ("psl", {}), ("async_sl", {"staleness_policy": "lr_decay",
                                   "client_mix": "fedasync_mix"}))}


def test_async_server_does_not_wait_for_the_straggler(straggler):
    sync, asyn = straggler["psl"], straggler["async_sl"]
    srv = asyn["nodes"]["srv"]
    assert srv["counters"]["server_steps"] == 2 * ITERS  # the same work as PSL's round
    assert sync["nodes"]["srv"]["counters"]["server_steps"] == ITERS  # concatenated batches
    ups = srv["updates_per_client"]
    assert sum(ups.values()) == 2 * ITERS and ups["c1"] > ups.get("c2", 0)
    assert asyn["nodes"]["c1"]["counters"]["client_steps"] == ups["c1"]
    assert sync["nodes"]["c2"]["counters"].get("client_steps") is None  # PSL: no counter
    # PSL waits for every one of c2's ITERS steps, async for the few c2 makes and one more.
    # Measured 0.79 s vs 1.22 s here; only the direction is asserted (a loaded box slows c1 too).
    assert asyn["wall_s"] < sync["wall_s"], (asyn["wall_s"], sync["wall_s"])


def test_staleness_is_measured_per_update(straggler):
    srv = straggler["async_sl"]["nodes"]["srv"]
    taus = srv["staleness"]
    assert len(taus) == 2 * ITERS + srv["dropped"]
    assert all(t >= 0 for t in taus) and max(taus) >= 1  # two clients interleave
    assert sum(srv["staleness_hist"].values()) == len(taus)
    # fedasync_mix: each client's W_c mixed into the global one once, when it stopped
    assert len(srv["client_staleness"]) == 2 and srv["counters"]["aggregations"] == 2
