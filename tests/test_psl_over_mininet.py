"""PSL end to end over real Mininet hosts: training, byte accounting, link speed, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nodes.models import build_model, segment_output_shape, split_model
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.errors import RunFailed
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds

pytestmark = pytest.mark.net
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")
BATCH = 32


def tiny_run(tmp_path, topo_params=None, on_round=None, **cfg):
    topo, _ = load_topology(TINY, params=topo_params or {})
    base = dict(name="t", dataset="digits", rounds=3, iters_per_round=30, batch_size=BATCH,
                lr=0.05, momentum=0.9, train_limit=None, test_limit=None,
                out_dir=str(tmp_path))
    exp = Experiment(RunConfig.from_dict({**base, **cfg}), topo, topology=TINY,
                     on_round=on_round)
    summary = exp.run()
    return exp, summary, read_rounds(exp.run_dir.path)


@pytest.fixture(scope="module")
def psl_run(tmp_path_factory):
    from tests.conftest import system_state

    before = system_state()
    exp, summary, rounds = tiny_run(tmp_path_factory.mktemp("psl"))
    after = system_state()
    return exp, summary, rounds, before, after


def test_psl_trains_over_mininet_and_writes_results(psl_run):
    exp, summary, rounds, *_ = psl_run
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[-1]["train_loss"] < rounds[0]["train_loss"] * 0.7
    assert rounds[-1]["test_acc"] > 0.6  # chance is 0.1 on digits
    for f in ("config.json", "rounds.jsonl", "summary.json", "pids.json",
              "ckpt/c1.pt", "ckpt/srv.pt", "logs/c1.log", "nodes/c1.json"):
        assert (exp.run_dir.path / f).exists(), f
    config = json.loads((exp.run_dir.path / "config.json").read_text())
    assert config["capabilities"]["switch"] in ("linuxbridge", "ovs")
    assert config["placement"] == {"c1": [0], "c2": [0], "srv": [1]}
    for r in rounds:
        assert set(r["nodes"]) == {"c1", "c2", "srv"}
        assert r["wall_s"] > 0 and r["nodes"]["c1"]["compute_s"] > 0


def test_the_runs_experiment_yaml_reproduces_it_bit_for_bit(psl_run, tmp_path, no_leaks):
    """`sledge run runs/<run>/experiment.yaml` is the same experiment: the same losses and
    accuracies every round and the same weights in every checkpoint, bit for bit."""
    import torch

    from testbed.cli.main import main

    exp, _, rounds, *_ = psl_run
    assert main(["run", str(exp.run_dir.path / "experiment.yaml"), "--out", str(tmp_path)]) == 0
    (again,) = tmp_path.iterdir()
    redo = read_rounds(again)
    assert [(r["train_loss"], r["test_acc"]) for r in redo] == [
        (r["train_loss"], r["test_acc"]) for r in rounds]
    for node in ("c1", "c2", "srv"):
        a, b = (torch.load(d / "ckpt" / f"{node}.pt", weights_only=False)
                for d in (exp.run_dir.path, again))
        flat_a, flat_b = (torch.nn.utils.parameters_to_vector(
            [t for s in x["segments"].values() for t in s.values()
             if torch.is_tensor(t) and t.is_floating_point()]) for x in (a, b))
        assert torch.equal(flat_a, flat_b), node
    first, second = (json.loads((d / "config.json").read_text())["config"]
                     for d in (exp.run_dir.path, again))
    assert second["run"].pop("out_dir") == str(tmp_path)  # the only field --out changed
    first["run"].pop("out_dir")
    assert first == second


def test_the_report_shows_what_rounds_jsonl_holds_and_renders_offline(psl_run, tmp_path):
    """report.md and report.html are written; the HTML's panel data is rounds.jsonl's (loss,
    accuracy, latency = compute + communication, bytes per link and node summed over the
    rounds), and headless Chromium with no network at all decodes every panel."""
    import re
    import shutil

    exp, _, rounds, *_ = psl_run
    folder = exp.run_dir.path
    md = (folder / "report.md").read_text()
    assert "status: **ok**" in md and f"| 3 | {rounds[-1]['train_loss']:.4f} |" in md
    page = (folder / "report.html").read_text()
    data = json.loads(re.search(r'id="panel-data">(.*?)</script>', page, re.S).group(1))
    assert [(r["round"], r["train_loss"], r["test_acc"], r["wall_s"]) for r in data["rounds"]
            ] == [(r["round"], r["train_loss"], r["test_acc"], r["wall_s"]) for r in rounds]
    for r in data["rounds"]:
        assert r["compute_s"] > 0 and r["compute_s"] + r["comm_s"] >= r["wall_s"] - 1e-9
    for intf, sums in data["links"].items():
        assert sums["tx_bytes"] == sum(r["interfaces"][intf]["tx_bytes"] for r in rounds)
    assert data["nodes"]["c1"]["tx_bytes"] == sum(r["nodes"]["c1"]["tx_bytes"] for r in rounds)
    assert {"c1-eth0", "srv-eth0"} <= set(data["links"])
    browser = shutil.which("chromium")
    assert browser, "chromium is installed by scripts/setup.sh"
    dom = subprocess.run(["unshare", "-n", browser, "--headless", "--no-sandbox",
                          "--disable-gpu", f"--user-data-dir={tmp_path}", "--dump-dom",
                          f"file://{folder}/report.html"], capture_output=True, text=True,
                         timeout=120)
    panels = page.count("<figure")
    assert panels == 4 and f'data-panels="{panels}"' in dom.stdout, dom.stderr[-500:]


def test_run_leaves_nothing_behind(psl_run):
    *_, before, after = psl_run
    leaked = {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}
    assert not leaked


def test_client_protocol_bytes_equal_activation_sizes_plus_headers(psl_run):
    exp, _, rounds, *_ = psl_run
    model = build_model("smallcnn", in_channels=1, image_size=8, num_classes=10)
    act_shape = segment_output_shape(split_model(model, ["conv2"])[0], (1, 8, 8))
    act_bytes = BATCH * 4 * int(__import__("math").prod(act_shape))
    label_bytes = BATCH * 8
    for r in rounds:
        for c in ("c1", "c2"):
            n = r["nodes"][c]
            assert n["tx_msgs"] == r["iters"]
            assert n["tx_bytes"] == r["iters"] * (act_bytes + label_bytes) + n["tx_header_bytes"]
            assert n["rx_bytes"] == r["iters"] * act_bytes + n["rx_header_bytes"]
            assert 0 < n["tx_header_bytes"] < 300 * r["iters"]  # small msgpack headers
        srv = r["nodes"]["srv"]
        assert srv["rx_bytes"] == r["nodes"]["c1"]["tx_bytes"] + r["nodes"]["c2"]["tx_bytes"]


def test_kernel_interface_counters_agree_with_protocol_bytes(psl_run):
    _, _, rounds, *_ = psl_run
    for r in rounds:
        for c in ("c1", "c2"):
            proto, intf = r["nodes"][c], r["interfaces"][f"{c}-eth0"]
            # TCP/IP/Ethernet headers, ZMTP framing and ACKs ride on top of the protocol bytes.
            assert proto["tx_bytes"] <= intf["tx_bytes"] <= proto["tx_bytes"] * 1.06 + 16384
            assert proto["rx_bytes"] <= intf["rx_bytes"] <= proto["rx_bytes"] * 1.06 + 16384


def test_slow_client_link_makes_round_measurably_slower(tmp_path, no_leaks):
    _, fast, _ = tiny_run(tmp_path / "fast", {"bw": 100}, rounds=1, iters_per_round=10)
    _, slow, _ = tiny_run(tmp_path / "slow", {"bw": 1}, rounds=1, iters_per_round=10)
    # 10 iterations x 2 x 33 KB through a 1 Mbit/s link: ~5 s serialised, less HTB's 15 KB
    # burst per idle period (~3 s); at 100 Mbit/s the whole round takes ~0.1 s.
    assert slow["mean_round_s"] > 5 * fast["mean_round_s"]
    assert slow["mean_round_s"] > 2.0


GARBAGE = r"""
import sys, zmq, msgpack
ctx = zmq.Context()
s = ctx.socket(zmq.DEALER)
s.setsockopt(zmq.IDENTITY, b"intruder")
s.setsockopt(zmq.LINGER, 2000)
s.connect(sys.argv[1])
s.send_multipart([b"\x00not msgpack at all"])
hdr = {"v": 1, "type": "ACT", "run": "x", "round": 0, "step": 0, "sender": "intruder",
       "seq": 0, "tensors": [["act", "float32", [1 << 20, 1 << 20], 4 << 40]], "meta": {}}
s.send_multipart([msgpack.packb(hdr), b"1234"])
s.close()
ctx.term()
"""


def test_malformed_frames_are_rejected_and_the_server_keeps_training(tmp_path, no_leaks):
    def inject(exp, rnd):
        if rnd == 1:
            addr = exp.node_configs["srv"]["listen"]
            c1 = exp.network.net.get("c1")
            out = c1.cmd(f"{sys.executable} -c '{GARBAGE}' {addr}; echo rc=$?")
            assert "rc=0" in out, out

    # Plain TCP: the frames must reach the decoder (with CURVE they are refused at the
    # handshake, tests/test_security.py).
    exp, summary, rounds = tiny_run(tmp_path, on_round=inject, rounds=3, iters_per_round=10,
                                    insecure=True)
    rejected = {}
    for r in rounds:
        for reason, n in r["nodes"]["srv"]["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + n
    assert sum(rejected.values()) == 2, rejected
    assert len(rounds) == 3 and rounds[-1]["train_loss"] < rounds[0]["train_loss"]


def test_a_crashed_node_fails_the_run_with_a_clear_message(tmp_path, no_leaks):
    def crash(exp, rnd):
        os.kill(exp.procs["c2"].pid, signal.SIGKILL)

    # Without restarts (max_restarts=0); with them, tests/test_fault_over_mininet.py.
    with pytest.raises(RunFailed, match=r"node c2 exited with code -9"):
        tiny_run(tmp_path, on_round=crash, rounds=3, iters_per_round=5, max_restarts=0)


def test_ctrl_c_tears_everything_down(tmp_path, no_leaks):
    cmd = [os.path.join(os.path.dirname(sys.executable), "sledge"), "run", TINY,
           "--dataset", "digits", "--rounds", "1000", "--iters", "5", "--out", str(tmp_path),
           "--name", "intr"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        rounds_file = None
        while time.monotonic() < deadline:
            found = list(tmp_path.glob("*-intr/rounds.jsonl"))
            if found and found[0].read_text().count("\n") >= 1:
                rounds_file = found[0]
                break
            time.sleep(0.2)
        assert rounds_file, p.stdout.read().decode() if p.poll() is not None else "no round"
        pids = json.loads((rounds_file.parent / "pids.json").read_text())
        p.send_signal(signal.SIGINT)
        assert p.wait(60) == 130
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    for pid in pids.values():
        assert not os.path.exists(f"/proc/{pid}"), f"node process {pid} survived"


def test_20ms_link_delay_makes_a_round_measurably_slower_than_0ms(tmp_path, no_leaks):
    _, zero, _ = tiny_run(tmp_path / "d0", {"delay": "0ms", "bw": 100}, rounds=1,
                          iters_per_round=10)
    _, twenty, _ = tiny_run(tmp_path / "d20", {"delay": "20ms", "bw": 100}, rounds=1,
                            iters_per_round=10)
    # Each iteration waits for ACT up and GRAD down: at least 10 x 40 ms of propagation.
    assert twenty["mean_round_s"] > 0.4
    assert twenty["mean_round_s"] > zero["mean_round_s"] + 0.3


def test_zygote_launched_nodes_join_their_hosts_and_train_identically(tmp_path, no_leaks,
                                                                       psl_run):
    namespaces = {}

    def check_ns(exp, rnd):
        for name, p in exp.procs.items():
            host = exp.network.host(name)
            namespaces[name] = (os.readlink(f"/proc/{p.pid}/ns/net"),
                                os.readlink(f"/proc/{host.pid}/ns/net"))

    _, _, rounds = tiny_run(tmp_path, on_round=check_ns, launcher="zygote")
    assert namespaces and all(node == host for node, host in namespaces.values()), namespaces
    _, _, popen_rounds, *_ = psl_run
    assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in popen_rounds]


def test_200_clients_on_shaped_links_through_the_shared_relay(tmp_path, no_leaks):
    from testbed.emu.linkcheck import iperf, ping

    n = 200
    probed: dict = {}

    # Each client's path crosses its own shaped link (10 ms each way) and the unshaped
    # server link: RTT 20 ms plus serialisation, as the median of the pings.
    def off(p: dict) -> bool:
        return p["lost"] == p["sent"] or not 19.5 <= p["rtt_ms"] <= 24.0

    def probe_links(exp, rnd):  # while the network is up: every link's delay, some rates
        net = exp.network
        srv = net.net.get("srv")
        probed["rtt"] = {f"c{i}": ping(net.net.get(f"c{i}"), srv.IP(), 3, 0.02)
                         for i in range(1, n + 1)}
        # A link off in 3 pings is probed again with 20: a slow link stays off, a probe that
        # met a busy core (CI once saw one link at 24.1 ms of 3) does not.
        probed["again"] = {c: ping(net.net.get(c), srv.IP(), 20, 0.02)
                           for c, p in probed["rtt"].items() if off(p)}
        probed["mbit"] = {c: iperf(net.net.get(c), srv, 2, port=5300 + i)
                          for i, c in enumerate(("c1", "c100", "c200"))}
        probed["stats"] = net.links.stats() if net.links.name == "relay" else None
        probed["procs"] = len({p.pid for p in getattr(net.links, "procs", {}).values()})

    _, _, rounds = tiny_run(tmp_path, {"clients": n, "bw": 20, "delay": "10ms"}, rounds=1,
                            iters_per_round=2, batch_size=8, launcher="zygote",
                            step_timeout_s=300, start_timeout_s=600, on_round=probe_links)
    (r,) = rounds
    clients = [c for c in r["nodes"] if c.startswith("c")]
    assert len(clients) == n and all(r["nodes"][c]["tx_msgs"] == 2 for c in clients)
    bad = {c: p for c, p in probed["again"].items() if off(p)}
    assert not bad, (bad, {c: probed["rtt"][c] for c in bad})
    assert all(15.0 <= m <= 21.0 for m in probed["mbit"].values()), probed["mbit"]
    if probed["stats"] is not None:  # relay backend: a few processes serve all 200 links
        assert probed["procs"] <= (os.cpu_count() or 1)
        assert len(probed["stats"]) == n
        assert all(s["up"]["packets"] > 0 and s["down"]["packets"] > 0
                   and s["params"]["up"]["bw_mbit"] == 20 for s in probed["stats"].values())


def test_fifty_forked_clients_train_one_psl_round_and_leave_nothing(tmp_path, no_leaks):
    _, summary, rounds = tiny_run(tmp_path, {"clients": 50, "delay": "0ms"}, rounds=1,
                                  iters_per_round=2, batch_size=8, launcher="zygote",
                                  step_timeout_s=120)
    (r,) = rounds
    clients = [n for n in r["nodes"] if n.startswith("c")]
    assert len(clients) == 50
    assert all(r["nodes"][c]["tx_msgs"] == 2 for c in clients)
    assert r["nodes"]["srv"]["rx_msgs"] == 100
