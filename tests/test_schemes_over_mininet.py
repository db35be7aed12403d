"""Every scheme over real Mininet hosts: it trains, its oracle holds on the measured run
(algorithms.md 14.4-14.7), and U-shaped mode keeps the labels off the wire, as checked on
frames captured inside the client's namespace (and shown able to fail)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from itertools import pairwise

import pytest
import torch

from nodes.runtime import build_context
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds
from tests import wiretap

pytestmark = pytest.mark.net
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")
WIRETAP = os.path.join(ROOT, "tests", "wiretap.py")
ROUNDS, ITERS, BATCH = 2, 20, 32
U_CUTS = ["conv1", "fc1"]  # U-shaped: client conv1 | server conv2 | client fc1, fc2
# scheme -> (topology parameters, scheme options); all use the same seeds and data.
SCHEMES = {"sl": ({}, {}), "sflv1": ({"fed": True}, {}), "sflv2": ({"fed": True}, {}),
           "epsl": ({}, {"phi": 0.5}), "fl": ({}, {})}


def mn_run(tmp_path, scheme: str, topo_params: dict | None = None, on_start=None,
           on_round=None, **cfg):
    topo, _ = load_topology(TINY, params=topo_params or {})
    base = dict(name=scheme, scheme=scheme, dataset="digits", rounds=ROUNDS,
                iters_per_round=ITERS, batch_size=BATCH, lr=0.05, momentum=0.9,
                train_limit=None, test_limit=None, out_dir=str(tmp_path))
    exp = Experiment(RunConfig.from_dict({**base, **cfg}), topo, topology=TINY,
                     on_start=on_start, on_round=on_round)
    exp.run()
    return exp, read_rounds(exp.run_dir.path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each scheme's run, made on first use and shared, with what it left behind."""
    from tests.conftest import system_state

    cache: dict[str, tuple] = {}

    def get(scheme: str) -> tuple:
        if scheme not in cache:
            topo, opts = SCHEMES[scheme]
            before = system_state()
            exp, rounds = mn_run(tmp_path_factory.mktemp(scheme), scheme, topo,
                                 scheme_options=opts)
            after = system_state()
            cache[scheme] = exp, rounds, {k: sorted(after[k] - before[k]) for k in after
                                          if after[k] - before[k]}
        return cache[scheme]

    return get


def checkpoints(exp) -> dict[str, dict]:
    return {n: torch.load(c["checkpoint"], weights_only=True)["segments"]
            for n, c in exp.node_configs.items()}


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_trains_over_mininet_well_above_chance(runs, scheme):
    exp, rounds, leaked = runs(scheme)
    assert not leaked
    assert rounds[-1]["test_acc"] > 0.6  # chance is 0.1 on digits
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"]
    for r in rounds:  # every node's traffic went through its own host's link
        for node, rec in r["nodes"].items():
            assert rec["tx_bytes"] > 0
            assert rec["tx_bytes"] <= r["interfaces"][f"{node}-eth0"]["tx_bytes"]


# ~7 min in the emulated guest (its FedAvg exchange and evaluation), a third of the guest
# list: EPSL covers the schemes over netem there; this one runs on the host.
@pytest.mark.guest_heavy
def test_sflv1_over_mininet_leaves_every_client_the_average_and_computes_fedavg(runs):
    sfl, rounds, _ = runs("sflv1")
    fl, fl_rounds, _ = runs("fl")
    assert set(sfl.node_configs) == {"c1", "c2", "srv", "fed"}
    assert sfl.node_configs["fed"]["role"] == "fedserver"
    ck, fk = checkpoints(sfl), checkpoints(fl)
    for k, v in ck["c1"][0].items():  # 14.4: every client holds the fed server's W_c
        assert torch.equal(v, ck["c2"][0][k]) and torch.equal(v, ck["fed"][0][k])
    for r in rounds:
        assert r["nodes"]["fed"]["counters"] == {"aggregations": 1}
        assert r["nodes"]["srv"]["counters"]["aggregations"] == 1
        assert r["nodes"]["fed"]["by_type"]["W_UP.rx_msgs"] == 2
    # Both halves of every client's model averaged with the same weights: FedAvg computed
    # in two places, so the split must not change the numbers beyond rounding.
    for seg, owner in ((0, "c1"), (1, "srv")):
        for k, v in ck[owner][seg].items():
            torch.testing.assert_close(v, fk["c1"][seg][k], rtol=1e-4, atol=1e-5)
    assert [r["train_loss"] for r in rounds] == pytest.approx(
        [r["train_loss"] for r in fl_rounds], rel=1e-4)


def test_sflv2_over_mininet_takes_one_server_step_per_client_batch(runs):
    _, rounds, _ = runs("sflv2")
    for r in rounds:
        srv = r["nodes"]["srv"]["counters"]
        assert srv["server_steps"] == 2 * ITERS and "aggregations" not in srv  # 14.5
        assert r["nodes"]["fed"]["counters"] == {"aggregations": 1}


def test_epsl_over_mininet_backprops_b_phi_plus_m_one_minus_phi_vectors(runs):
    _, rounds, _ = runs("epsl")
    for r in rounds:  # phi=0.5, b=32, M=2: 16 shared + 2 x 16 own rows per iteration
        assert r["nodes"]["srv"]["counters"]["server_bp_vectors"] == ITERS * 48
        for c in ("c1", "c2"):
            bt = r["nodes"][c]["by_type"]
            assert bt["GRAD_BCAST.rx_msgs"] == bt["GRAD.rx_msgs"] == ITERS


def handoff_chain(rounds: list[dict], clients: list[str]) -> list[dict]:
    chain = []
    for r in rounds:
        chain += sorted((r["nodes"][c]["handoff"] for c in clients),
                        key=lambda t: t["position"])
    return chain


def test_vanilla_sl_over_mininet_hands_each_client_the_model_the_last_one_left(runs):
    _, rounds, _ = runs("sl")
    chain = handoff_chain(rounds, ["c1", "c2"])
    assert len(chain) == 2 * ROUNDS
    for before, after in pairwise(chain):  # 14.6, bitwise (digests)
        assert after["start"] == before["end"] != before["start"]
    for r in rounds:
        assert r["nodes"]["srv"]["counters"]["server_steps"] == 2 * ITERS
        assert r["nodes"]["srv"]["by_type"]["W_UP.rx_msgs"] == 2


# -- U-shaped: the labels on the wire -----------------------------------------------------
def labels_sent_by(exp, client: str, batches: int) -> list[bytes]:
    """The int64 bytes of every label batch `client` trained on, replayed from its config
    through the node's own data path (no sockets: no listen address, no peers)."""
    ctx = build_context({**exp.node_configs[client], "listen": None, "peers": {}}, None)
    return [y.numpy().astype("<i8").tobytes() for _, y in ctx.batches(batches)]


def tapped_run(tmp_path, scheme: str, options: dict, rounds: int, iters: int,
               insecure: bool = True):
    """A U-shaped run with a capture of c1's link, from before any node starts until after
    the last round. Plain TCP by default (--insecure): what is looked for on the wire is
    plaintext, which CURVE would hide whether the scheme sent it or not."""
    cap, tap = tmp_path / "c1.frames", {}

    def start(exp):
        p = exp.network.host("c1").popen([sys.executable, WIRETAP, "c1-eth0", str(cap)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        tap["proc"] = p
        tap["ip"] = {n: exp.network.ip(n) for n in exp.node_configs}  # gone with the net
        assert p.stdout.readline().strip() == b"ready", p.stderr.read().decode()

    def stop(exp, rnd):
        if rnd == exp.cfg.run.rounds:
            tap["proc"].send_signal(signal.SIGTERM)
            out, _ = tap["proc"].communicate(timeout=60)
            tap["stats"] = json.loads(out.decode().splitlines()[-1])

    try:
        exp, recs = mn_run(tmp_path, scheme, on_start=start, on_round=stop, rounds=rounds,
                           iters_per_round=iters, cuts=U_CUTS, insecure=insecure,
                           scheme_options={"u_shaped": True, **options})
    finally:
        p = tap.get("proc")
        if p is not None and p.poll() is None:
            p.kill()
            p.communicate()
    frames = wiretap.read_frames(str(cap))
    return exp, recs, tap, wiretap.streams(frames), labels_sent_by(exp, "c1", rounds * iters)


@pytest.mark.parametrize(("scheme", "options"), [("psl", {}), ("sl", {"handoff": "p2p"})])
def test_u_shaped_labels_never_cross_the_client_link(tmp_path, no_leaks, scheme, options):
    exp, rounds, tap, streams, labels = tapped_run(tmp_path, scheme, options, ROUNDS, ITERS)
    assert tap["stats"]["packets"] > 0 and tap["stats"]["drops"] == 0
    # The capture is whole: each TCP direction reassembles into one gapless stream, and what
    # c1 sent holds at least every protocol byte c1 counted.
    assert streams and all(len(chunks) == 1 for chunks in streams.values())
    c1_ip = tap["ip"]["c1"]
    sent = sum(len(c) for flow, cs in streams.items() if flow[0] == c1_ip for c in cs)
    assert sent >= sum(r["nodes"]["c1"]["tx_bytes"] for r in rounds)
    assert len(labels) == ROUNDS * ITERS and len(set(labels)) == len(labels)
    assert [wiretap.occurrences(streams, y) for y in labels] == [0] * len(labels)
    assert wiretap.occurrences(streams, b"labels") == 0  # no header names a labels tensor
    for r in rounds:
        assert not [t for rec in r["nodes"].values() for t in rec["rx_tensors"] if "labels" in t]
        assert {"ACT:act", "GRAD2:grad"} <= set(r["nodes"]["srv"]["rx_tensors"])
        c1 = r["nodes"]["c1"]["by_type"]  # 14.7: four messages per batch, two each way
        assert c1["ACT.tx_msgs"] == c1["GRAD2.tx_msgs"] == ITERS
        assert c1["ACT2.rx_msgs"] == c1["GRAD.rx_msgs"] == ITERS
    assert exp.placement["c1"] == [0, 2] and 1 in exp.placement["srv"]
    assert rounds[-1]["test_acc"] > 0.6
    if scheme == "sl":  # the hand-off (head and tail) went client to client
        chain = handoff_chain(rounds, ["c1", "c2"])
        assert all(a["start"] == b["end"] for b, a in pairwise(chain))
        assert any(flow[0] == c1_ip and flow[2] == tap["ip"]["c2"] for flow in streams)


@pytest.mark.parametrize("insecure", [True, False])
def test_the_wire_check_finds_the_labels_a_debug_option_sends(tmp_path, no_leaks, insecure):
    """In plain TCP the capture finds every label the debug option sends; with CURVE (every
    run's default) the same labels cross encrypted and the capture finds none."""
    exp, rounds, tap, streams, labels = tapped_run(
        tmp_path, "psl", {"debug_send_labels": True}, rounds=1, iters=10, insecure=insecure)
    assert tap["stats"]["drops"] == 0
    seen = 1 if insecure else 0
    assert [wiretap.occurrences(streams, y) for y in labels] == [seen] * len(labels)
    assert wiretap.occurrences(streams, b"labels") == seen * len(labels)
    assert "ACT:labels" in rounds[0]["nodes"]["srv"]["rx_tensors"]
