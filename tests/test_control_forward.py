"""Nodes on another machine (docs/cluster.md), on loopback: the control channel through the
control forwarder (testbed.run.forward) to the controller's TCP endpoint, CURVE end to end, and
checkpoints brought back with the round reports instead of read from a shared filesystem.

Endpoint checks first: a node's DEALER dialling the forwarder's ipc path reaches a CURVE
ROUTER bound on TCP, whose gatekeeper still refuses a foreign key and a keyless peer, the
latter also straight on the TCP endpoint; without security that same keyless peer is admitted
(the check can fail). Then whole runs: a run whose nodes all count as remote trains exactly as
the direct run, through one forwarder process, while a keyless stranger knocks on the TCP
endpoint; and the controller's copies of the checkpoints are the nodes' files, byte for byte.
Without security the stranger takes c1's control connection over and the run fails. A server
killed mid-round restarts through the forwarder and the run still ends as the direct one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from nodes.protocol import Endpoint, Gatekeeper, Message, Security, encode
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.errors import BadInput, ConfigError, RunFailed
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds
from tests.test_schemes_loopback import free_ports

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "topologies" / "tiny.py")


def start_forwarder(listen: str, to: str) -> subprocess.Popen:
    """A forwarder process, as a remote server runs it; returns once it listens."""
    p = subprocess.Popen([sys.executable, "-m", "testbed.run.forward", "--listen", listen,
                          "--to", to], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.startswith("forwarding "), line
    return p


def stop_forwarder(p: subprocess.Popen) -> None:
    p.terminate()
    p.wait(10)


def wait_for(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def controller(zctx: zmq.Context, sec: Security | None, ipc: str) -> tuple[Endpoint, Gatekeeper]:
    """A ROUTER as the controller's: its own ipc path, and a TCP endpoint on a free port."""
    gk = Gatekeeper(zctx, sec)
    ep = Endpoint(zctx, "router", "controller", run="r", security=sec, gatekeeper=gk,
                  expected={"c1", "c1#hb"})
    ep.bind(f"ipc://{ipc}")
    ep.bind("tcp://127.0.0.1:0")
    return ep, gk


def test_a_node_through_the_forwarder_reaches_a_curve_router_on_tcp(zctx, tmp_path):
    keys = Security.for_run(["controller", "c1"])
    ctl, gk = controller(zctx, keys["controller"], str(tmp_path / "control"))
    tcp = ctl.last_endpoint.removeprefix("tcp://")
    # The forwarder makes the remote folder itself: on a server the path exists nowhere.
    listen = str(tmp_path / "server2" / "ctl" / "remote")
    fwd = start_forwarder(listen, tcp)
    c1 = Endpoint(zctx, "dealer", "c1", run="r", security=keys["c1"])
    c1.connect(f"ipc://{listen}", server="controller")
    forged = zctx.socket(zmq.DEALER)  # CURVE through the forwarder, a key the run did not make
    forged.setsockopt(zmq.ROUTING_ID, b"c1")
    pub, sec = zmq.curve_keypair()
    forged.curve_publickey, forged.curve_secretkey = pub, sec
    forged.curve_serverkey = keys["controller"].public.encode()
    plain = zctx.socket(zmq.DEALER)  # no key at all, straight on the TCP endpoint
    plain.setsockopt(zmq.ROUTING_ID, b"c1")
    try:
        c1.send("HELLO", meta={"via": "forwarder"})
        sender, msg = ctl.recv(5)
        assert (sender, msg.meta) == ("c1", {"via": "forwarder"})
        ctl.send("CTRL", to="c1", meta={"cmd": "round"})  # and back, routed by identity
        assert c1.recv(5)[1].meta == {"cmd": "round"}
        assert oct(os.stat(listen).st_mode & 0o777) == oct(0o600)
        forged.connect(f"ipc://{listen}")
        forged.send(b"forged")
        plain.connect(f"tcp://{tcp}")
        plain.send(b"plain")
        wait_for(lambda: {"handshake_failed", "auth_denied"} <= set(ctl.rejections()))
        got = ctl.rejections()
        assert got.get("auth_denied", 0) >= 1 and got.get("handshake_failed", 0) >= 1, got
        c1.send("HELLO", meta={"n": 2})  # c1's connection is still its own
        sender, msg = ctl.recv(5)
        assert (sender, msg.meta) == ("c1", {"n": 2})
        assert not ctl.poll(0.3)  # nothing of the strangers got through
    finally:
        for s in (forged, plain):
            s.close(0)
        c1.close()
        ctl.close()
        gk.stop()
        stop_forwarder(fwd)
    assert fwd.returncode == 0 and not os.path.exists(listen)  # no socket file left


def test_without_security_the_same_keyless_peer_is_admitted(zctx, tmp_path):
    """The can-fail proof of the refusals above: with no keys, a plain DEALER on the TCP
    endpoint claiming c1 is heard as c1."""
    ctl, gk = controller(zctx, None, str(tmp_path / "control"))
    plain = zctx.socket(zmq.DEALER)
    plain.setsockopt(zmq.ROUTING_ID, b"c1")
    try:
        plain.connect(ctl.last_endpoint)
        plain.send_multipart(encode(Message("HELLO", run="r", sender="c1",
                                            meta={"who": "stranger"})))
        sender, msg = ctl.recv(5)
        assert (sender, msg.meta) == ("c1", {"who": "stranger"})
        assert ctl.rejections() == {}
    finally:
        plain.close(0)
        ctl.close()
        gk.stop()


def test_remote_hosts_need_a_tcp_control_endpoint():
    with pytest.raises(ConfigError, match="cluster"):
        RunConfig.from_dict({"cluster": {"remote": ["c1"]}})
    with pytest.raises(ConfigError, match="cluster.control"):
        RunConfig.from_dict({"cluster": {"control": "no-port"}})


def test_an_unknown_remote_host_is_refused_before_any_node_starts(tmp_path):
    topo, _ = load_topology(TINY, params={"clients": 2})
    cfg = RunConfig.from_dict({"dataset": "digits", "out_dir": str(tmp_path),
                               "cluster": {"control": "127.0.0.1:0", "remote": ["c9"]}})
    with pytest.raises(BadInput, match=r"cluster.remote.*c9"), \
            Experiment(cfg, topo, topology=TINY, loopback=True) as exp:
        exp.run()
    assert not exp.procs and not any(tmp_path.iterdir())


# -- whole runs ---------------------------------------------------------------------------------
def loop_run(tmp_path: Path, on_start=None, on_ready=None, **over) -> tuple[Experiment, list]:
    topo, _ = load_topology(TINY, params={"clients": 2})
    base = dict(name="fwd", scheme="psl", dataset="digits", rounds=2, iters_per_round=6,
                batch_size=16, train_limit=None, test_limit=200, out_dir=str(tmp_path),
                port=free_ports())
    exp = Experiment(RunConfig.from_dict({**base, **over}), topo, topology=TINY, loopback=True,
                     on_start=on_start, on_ready=on_ready)
    exp.run()
    return exp, read_rounds(exp.run_dir.path)


def segments(path: str) -> dict:
    return torch.load(path, weights_only=True)["segments"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a.values(), b.values(), strict=True))


HOSTS = ["c1", "c2", "srv"]


def remote_run(tmp_path: Path, **over) -> tuple[Experiment, list]:
    """Every node counts as remote: all dial one forwarder process (one "server"), started
    once the controller listens, and a keyless stranger claiming c1 knocks on the TCP control
    endpoint once the nodes are up, before round 1."""
    started: dict = {}

    def forwarders(exp: Experiment) -> None:  # what a cluster launcher does on each server
        started["fwd"] = start_forwarder(exp.remote_control.removeprefix("ipc://"),
                                         exp.control.tcp)

    def knock(exp: Experiment) -> None:
        s = started["ctx"] = zmq.Context()
        sock = started["sock"] = s.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"c1")
        sock.connect(f"tcp://{exp.control.tcp}")
        sock.send(b"let me in")
        time.sleep(1.0)  # its handshake is done (insecure) or refused (CURVE) before round 1

    try:
        return loop_run(tmp_path, forwarders, knock,
                        cluster={"control": "127.0.0.1:0", "remote": HOSTS}, **over)
    finally:
        if "sock" in started:
            started["sock"].close(0)
            started["ctx"].term()
        if "fwd" in started:
            stop_forwarder(started["fwd"])


def test_remote_nodes_train_through_the_forwarder_as_the_direct_run(tmp_path):
    direct, direct_rounds = loop_run(tmp_path / "direct")
    remote, rounds = remote_run(tmp_path / "remote")
    hosts = HOSTS
    # The nodes dialled the forwarder, not the controller's own ipc path.
    assert {nc["control"] for nc in remote.node_configs.values()} == {remote.remote_control}
    assert all(nc["ship_checkpoint"] for nc in remote.node_configs.values())
    assert "ship_checkpoint" not in direct.node_configs["c1"]
    # Same training and the same evaluation, bit for bit.
    assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in direct_rounds]
    assert ([r["test_acc_per_client"] for r in rounds]
            == [r["test_acc_per_client"] for r in direct_rounds])
    for h in hosts:
        kept = remote.checkpoint_path(h)
        own = remote.node_configs[h]["checkpoint"]
        assert kept != own and Path(kept).read_bytes() == Path(own).read_bytes()
        assert same(segments(kept), segments(direct.checkpoint_path(h)))
        # The previous round as the node keeps it, for a rollback or a resume.
        assert torch.load(f"{kept}.prev", weights_only=True)["round"] == 1
    summary = (Path(remote.run_dir.path) / "summary.json").read_text()
    assert '"handshake_failed"' in summary  # the stranger was refused and counted


def test_with_insecure_the_stranger_on_tcp_takes_c1s_control_over(tmp_path):
    """The can-fail proof at run level: without CURVE the same stranger is admitted, takes
    c1's control connection (ROUTER_HANDOVER), c1 never hears of round 1 and the run fails
    (PSL: the others wait for c1, so nobody reports)."""
    with pytest.raises(RunFailed, match=r"round 1: no REPORT from \[.*'c1'"):
        remote_run(tmp_path, insecure=True, round_timeout_s=8.0, max_restarts=0)


def test_a_remote_server_killed_mid_round_restarts_through_the_forwarder(tmp_path):
    """Recovery across the forwarder: the server is killed in the middle of round 2 (by the
    clients' steps in their heartbeats); it restarts from its own checkpoint (dialling the
    forwarder again), the clients roll back and the round is redone. The result is the direct
    run's bit for bit, and the controller's copy of each checkpoint is the node's file."""
    # Rounds long enough that the heartbeats (every 0.1 s) surely show round 2's middle.
    over = dict(iters_per_round=400, heartbeat_s=0.1)
    direct, direct_rounds = loop_run(tmp_path / "direct", **over)
    started: dict = {}

    def forwarders(exp: Experiment) -> None:
        started["fwd"] = start_forwarder(exp.remote_control.removeprefix("ipc://"),
                                         exp.control.tcp)

    def kill_srv(exp: Experiment, rnd: int) -> None:
        if rnd != 1:
            return
        pid = exp.procs["srv"].pid

        def mid_round_2() -> bool:  # round 1 ended at step 400: fewer is round 2's
            st = exp.recovery.status.get("c1", {})
            return st.get("state") == "training" and 10 <= st.get("iteration", 0) < 300

        def kill() -> None:
            wait_for(mid_round_2, 60)
            started["killed_at"] = exp.recovery.status.get("c1", {}).get("iteration")
            if mid_round_2():  # else the assertion below says the window was missed
                os.kill(pid, signal.SIGKILL)

        started["thread"] = threading.Thread(target=kill, daemon=True)
        started["thread"].start()

    topo, _ = load_topology(TINY, params={"clients": 2})
    base = dict(name="fwd", scheme="psl", dataset="digits", rounds=2, batch_size=16,
                train_limit=None, test_limit=200, out_dir=str(tmp_path / "remote"),
                port=free_ports(), cluster={"control": "127.0.0.1:0", "remote": HOSTS})
    exp = Experiment(RunConfig.from_dict({**base, **over}), topo, topology=TINY,
                     loopback=True, on_start=forwarders, on_round=kill_srv)
    try:
        summary = exp.run()
    finally:
        if "fwd" in started:
            stop_forwarder(started["fwd"])
    rounds = read_rounds(exp.run_dir.path)
    assert started["killed_at"] is not None and 10 <= started["killed_at"] < 300, started
    assert summary["recovery"]["restarts"] == 1 and summary["recovery"]["redone"] == [2], \
        summary["recovery"]
    assert [r["train_loss"] for r in rounds] == [r["train_loss"] for r in direct_rounds]
    for h in HOSTS:
        kept, own = exp.checkpoint_path(h), exp.node_configs[h]["checkpoint"]
        assert Path(kept).read_bytes() == Path(own).read_bytes()
        assert same(segments(kept), segments(direct.checkpoint_path(h)))
