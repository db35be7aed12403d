"""EPSL against PSL end to end on the loopback network (real node processes and ZeroMQ, no
Mininet): phi=0 is PSL bit for bit, phi=1 back-propagates 1/M of PSL's vectors (algorithms.md
14.1-14.2). These are about the math, so no link emulation is needed; the other schemes'
oracles are checked on their Mininet runs (test_schemes_over_mininet.py)."""

from __future__ import annotations

import os
import random
import socket

import pytest
import torch

from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")
BATCH, ITERS = 16, 6


def free_ports(n: int = 8) -> int:
    """The first of `n` consecutive free TCP ports on 127.0.0.1 (others may run tests too)."""
    for _ in range(100):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def loop_run(tmp_path, scheme: str, topo_params: dict | None = None, **cfg):
    topo, _ = load_topology(TINY, params=topo_params or {})
    base = dict(name=scheme, scheme=scheme, dataset="digits", rounds=2, iters_per_round=ITERS,
                batch_size=BATCH, lr=0.05, momentum=0.9, train_limit=None, test_limit=300,
                out_dir=str(tmp_path), port=free_ports())
    exp = Experiment(RunConfig.from_dict({**base, **cfg}), topo, topology=TINY, loopback=True)
    exp.run()
    return exp, read_rounds(exp.run_dir.path)


def checkpoints(exp) -> dict[str, dict]:
    return {n: torch.load(c["checkpoint"], weights_only=True)["segments"]
            for n, c in exp.node_configs.items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


M = 3  # clients


@pytest.fixture(scope="module")
def psl_run(tmp_path_factory):
    return loop_run(tmp_path_factory.mktemp("psl"), "psl", {"clients": M}, name="cmp")


def test_epsl_with_phi_zero_trains_bit_identically_to_psl(psl_run, tmp_path):
    psl, psl_rounds = psl_run
    # The same run name, so that the run ids in the headers have the same length.
    epsl, epsl_rounds = loop_run(tmp_path, "epsl", {"clients": M}, name="cmp",
                                 scheme_options={"phi": 0.0})
    a, b = checkpoints(psl), checkpoints(epsl)
    assert a.keys() == b.keys() == {"c1", "c2", "c3", "srv"}
    for node in a:
        for seg in a[node]:
            assert same(a[node][seg], b[node][seg]), (node, seg)
    for r1, r2 in zip(psl_rounds, epsl_rounds, strict=True):
        assert r1["train_loss"] == r2["train_loss"]
        for node in a:
            assert r1["nodes"][node]["by_type"] == r2["nodes"][node]["by_type"]  # no GRAD_BCAST
        assert r1["nodes"]["srv"]["counters"] == r2["nodes"]["srv"]["counters"]


def test_epsl_with_phi_one_backprops_one_mth_of_psl_vectors_and_sends_one_row_set(psl_run,
                                                                                   tmp_path):
    _, psl = psl_run
    _, full = loop_run(tmp_path, "epsl", {"clients": M}, scheme_options={"phi": 1.0})
    for r_psl, r_full in zip(psl, full, strict=True):
        p, f = r_psl["nodes"]["srv"]["counters"], r_full["nodes"]["srv"]["counters"]
        assert p["server_bp_vectors"] == ITERS * M * BATCH
        assert f["server_bp_vectors"] * M == p["server_bp_vectors"]          # 1/M, exactly
        assert f["grad_rows_down"] == ITERS * BATCH                    # b per iteration
        assert f["grad_bytes_down"] * M == pytest.approx(p["grad_bytes_down"],
                                                                 rel=0.02)
        srv = r_full["nodes"]["srv"]["by_type"]
        assert srv["GRAD_BCAST.tx_msgs"] == ITERS * M and srv.get("GRAD.tx_msgs", 0) == 0
        # On a star of unicast links each client still gets its copy: the measured downlink
        # bytes do not shrink, only what a broadcast medium would carry does.
        clients = [r_full["nodes"][f"c{i}"]["by_type"] for i in range(1, M + 1)]
        assert len({c["GRAD_BCAST.rx"] for c in clients}) == 1
        assert all(c["GRAD_BCAST.rx_msgs"] == ITERS for c in clients)
