"""PSL over two machines with Mininet's cluster edition (docs/cluster.md): one client's host on
the other server, its link a GRE tunnel between the machines, its node started there over SSH,
its control connection through a forwarder there, its checkpoints back with its REPORTs.

Needs a second machine: SLEDGE_CLUSTER_SERVER (its address; password-less root SSH to it,
Open vSwitch and this checkout at the same path) and SLEDGE_CLUSTER_CONTROL (this machine's
address the other reaches). `scripts/vm.sh cluster-test` boots two guests and sets both;
elsewhere the test is skipped.

The same run on one machine first, then with c2 on the other server: the losses and the
per-client accuracies are equal round by round, and rounds.jsonl has the counters of the
interfaces on both machines (c2's end of the tunnel read on the other server, s1's here).
"""

from __future__ import annotations

import json
import os

import pytest

from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds

SERVER = os.environ.get("SLEDGE_CLUSTER_SERVER", "")
CONTROL = os.environ.get("SLEDGE_CLUSTER_CONTROL", "")
pytestmark = [pytest.mark.net, pytest.mark.skipif(
    not (SERVER and CONTROL), reason="needs a second machine: SLEDGE_CLUSTER_SERVER and "
                                     "SLEDGE_CLUSTER_CONTROL (scripts/vm.sh cluster-test)")]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")


def run(tmp_path, **over):
    topo, _ = load_topology(TINY, params={"clients": 2})
    base = dict(name="cl", scheme="psl", dataset="digits", model="smallcnn", rounds=2,
                iters_per_round=4, batch_size=16, train_limit=None, test_limit=200,
                out_dir=str(tmp_path), start_timeout_s=900.0, round_timeout_s=900.0)
    exp = Experiment(RunConfig.from_dict({**base, **over}), topo, topology=TINY)
    summary = exp.run()
    return exp, summary, read_rounds(exp.run_dir.path)


@pytest.mark.timeout(3600)
def test_psl_with_a_client_on_another_machine_trains_as_on_one(tmp_path):
    _, _, direct = run(tmp_path / "one")
    exp, summary, rounds = run(tmp_path / "two", cluster={
        "servers": ["localhost", SERVER], "place": {"c2": SERVER},
        "control": f"{CONTROL}:0"})
    assert summary["status"] == "ok"
    config = json.loads((exp.run_dir.path / "config.json").read_text())
    assert config["network"] == "mininet-cluster"
    assert {h: d["server"] for h, d in config["hosts"].items()} == {
        "c1": "localhost", "c2": SERVER, "srv": "localhost"}
    assert exp.cfg.cluster.remote == ["c2"]  # placed there, so remote
    assert exp.node_configs["c2"]["ship_checkpoint"] and "ship_checkpoint" not in \
        exp.node_configs["c1"]
    # The same training, bit for bit.
    assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in direct]
    assert ([r["test_acc_per_client"] for r in rounds]
            == [r["test_acc_per_client"] for r in direct])
    # c2's checkpoint came back with its REPORT; its log came back over SSH.
    assert (exp.run_dir.path / "ckpt" / "c2.pt").stat().st_size > 0
    assert (exp.run_dir.path / "logs" / "c2.log").read_text(errors="replace").strip()
    # Per-link bytes from both machines: c2's end of the tunnel on the other server, the
    # switch's end of it and the local links here. The tunnel's two ends count the same
    # frames: what c2 sent is what s1 received (GRE headers are outside the tap device).
    s1_c2 = f"s1-eth{exp.topo.port('s1', 'c2')[0]}"  # Mininet names ports by the topology's
    for r in rounds:
        ifaces = r["interfaces"]
        assert {"c1-eth0", "c2-eth0", "srv-eth0", s1_c2} <= set(ifaces), sorted(ifaces)
        sent = r["nodes"]["c2"]
        assert ifaces["c2-eth0"]["tx_bytes"] >= sent["tx_bytes"] > 0, (ifaces, sent)
        assert ifaces[s1_c2]["rx_packets"] >= ifaces["c2-eth0"]["tx_packets"] * 0.9
