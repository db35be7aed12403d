"""No stranger can break a run: CURVE keys per run, the gatekeeper's bounds, expected identities,
unexpected messages dropped, every refusal counted (docs/security.md).

Endpoint-level checks first (fast), then real loopback runs attacked from the test process while
their nodes wait for round 1. Each protection is also shown to fail without it: with --insecure
a stranger takes over c1's connection, and with the receive budget raised the server's memory
grows by what strangers send.
"""

from __future__ import annotations

import os
import threading
import time

import psutil
import pytest
import zmq

from nodes.protocol import Endpoint, Gatekeeper, Message, Security, encode
from testbed import Experiment
from testbed.emu.topology import load_topology
from testbed.errors import RunFailed
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds
from tests.test_schemes_loopback import free_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")


# -- endpoints ----------------------------------------------------------------------------------
@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def server(zctx: zmq.Context, keys: dict[str, Security] | None, port: int, **kw
           ) -> tuple[Endpoint, Gatekeeper]:
    gk = Gatekeeper(zctx, keys["srv"] if keys else None)
    ep = Endpoint(zctx, "router", "srv", run="r", security=keys["srv"] if keys else None,
                  gatekeeper=gk, **kw)
    ep.bind(f"tcp://127.0.0.1:{port}")
    return ep, gk


def wait_for(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_only_the_runs_keys_get_in_and_each_refusal_is_counted(zctx):
    keys = Security.for_run(["srv", "c1"])
    port = free_ports(1)
    srv, gk = server(zctx, keys, port)
    c1 = Endpoint(zctx, "dealer", "c1", run="r", security=keys["c1"])
    c1.connect(f"tcp://127.0.0.1:{port}", server="srv")
    plain = zctx.socket(zmq.DEALER)  # no key at all, claiming c1's identity
    plain.setsockopt(zmq.ROUTING_ID, b"c1")
    plain.connect(f"tcp://127.0.0.1:{port}")
    plain.send(b"hello?")
    forged = zctx.socket(zmq.DEALER)  # CURVE, but a key the run did not make
    pub, sec = zmq.curve_keypair()
    forged.curve_publickey, forged.curve_secretkey = pub, sec
    forged.curve_serverkey = keys["srv"].public.encode()
    forged.connect(f"tcp://127.0.0.1:{port}")
    try:
        wait_for(lambda: {"handshake_failed", "auth_denied"} <= set(srv.rejections()))
        c1.send("HELLO")  # the run's own client still gets through, and is routed to
        assert srv.recv(5)[0] == "c1"
        srv.send("HELLO", to="c1")
        assert c1.recv(5)[1].type == "HELLO"
        got = srv.rejections()
        assert got["handshake_failed"] >= 1 and got["auth_denied"] >= 1, got
    finally:
        for s in (plain, forged):
            s.close(0)
        for ep in (c1, srv):
            ep.close()
        gk.stop()


@pytest.mark.parametrize("cap", [1, 4])
def test_connections_past_the_cap_are_refused(zctx, cap):
    """cap 1: the second client is refused at its handshake; cap 4 (the can-fail case): in."""
    keys = Security.for_run(["srv", "c1", "c2"])
    port = free_ports(1)
    srv, gk = server(zctx, keys, port, max_connections=cap)
    eps = []
    try:
        for name in ("c1", "c2"):
            ep = Endpoint(zctx, "dealer", name, run="r", security=keys[name],
                          send_timeout_s=2.0)
            ep.connect(f"tcp://127.0.0.1:{port}", server="srv")
            eps.append(ep)
            if name == "c1":
                ep.send("HELLO")
                assert srv.recv(5)[0] == "c1"
        if cap == 1:
            wait_for(lambda: "too_many_connections" in srv.rejections())
            assert srv.rejections().get("too_many_connections", 0) >= 1
            with pytest.raises(TimeoutError):  # its DEALER never gets a connection to send on
                eps[1].send("HELLO")
        else:
            eps[1].send("HELLO")
            assert srv.recv(5)[0] == "c2"
            assert "too_many_connections" not in srv.rejections()
    finally:
        for ep in (*eps, srv):
            ep.close()
        gk.stop()


@pytest.mark.parametrize("expected", [{"c1"}, None])
def test_a_foreign_identity_is_dropped_by_the_expected_set(zctx, expected):
    """With the set, x9's well-formed ACT is dropped and counted; without it (can-fail), in."""
    port = free_ports(1)
    srv, gk = server(zctx, None, port, expected=expected)
    x9 = Endpoint(zctx, "dealer", "x9", run="r")
    x9.connect(f"tcp://127.0.0.1:{port}")
    try:
        x9.send("ACT", round=1)
        if expected is None:
            assert srv.recv(5)[0] == "x9"
        else:
            with pytest.raises(TimeoutError):
                srv.recv(1.0)
            assert srv.rejections() == {"unexpected_sender": 1}
    finally:
        x9.close()
        srv.close()
        gk.stop()


# -- attacked loopback runs ---------------------------------------------------------------------
def config(tmp_path, **over) -> RunConfig:
    base = dict(name="sec", scheme="psl", dataset="digits", rounds=2, iters_per_round=6,
                batch_size=16, train_limit=None, test_limit=200, out_dir=str(tmp_path),
                port=free_ports(), step_timeout_s=20.0)
    return RunConfig.from_dict({**base, **over})


def run(tmp_path, attack=None, **over) -> tuple[Experiment, list[dict], dict | None]:
    """A PSL loopback run; `attack(exp)` runs once every node is up, before round 1."""
    topo, _ = load_topology(TINY, params={"clients": 2})
    exp = Experiment(config(tmp_path, **over), topo, topology=TINY, loopback=True,
                     on_ready=attack)
    summary = None
    try:
        summary = exp.run()
    finally:
        stop_attackers(exp)
    return exp, read_rounds(exp.run_dir.path), summary


def stop_attackers(exp: Experiment) -> None:
    for sock in getattr(exp, "attackers", []):
        sock.close(0)
    if getattr(exp, "attack_ctx", None):
        exp.attack_ctx.term()


def attacker(exp: Experiment, identity: bytes) -> zmq.Socket:
    """A plain DEALER of the test process (no key) claiming `identity`."""
    if not hasattr(exp, "attack_ctx"):
        exp.attack_ctx, exp.attackers = zmq.Context(), []
    sock = exp.attack_ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, identity)
    exp.attackers.append(sock)
    return sock


def losses(rounds: list[dict]) -> list[float]:
    return [r["train_loss"] for r in rounds]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    return run(tmp_path_factory.mktemp("calm"))


def take_over_c1(exp: Experiment) -> None:
    sock = attacker(exp, b"c1")
    sock.connect(exp.node_configs["srv"]["listen"])
    time.sleep(1.0)  # its handshake is done (insecure) or refused (CURVE) before round 1


def test_a_keyless_dealer_as_c1_changes_nothing(undisturbed, tmp_path):
    _, calm_rounds, _ = undisturbed
    exp, rounds, summary = run(tmp_path, take_over_c1)
    assert losses(rounds) == losses(calm_rounds)  # bit-identical, no stall
    assert summary["status"] == "ok"
    assert summary["rejected"]["srv"].get("handshake_failed", 0) >= 1, summary["rejected"]
    assert not exp.cfg.security.insecure


def test_with_insecure_the_same_dealer_takes_c1_over_and_the_run_stalls(tmp_path):
    """The can-fail proof of the test above: without CURVE, ROUTER_HANDOVER gives c1's
    connection to the stranger; c1 never gets its gradient and the round fails."""
    with pytest.raises(RunFailed):
        run(tmp_path, take_over_c1, insecure=True, step_timeout_s=4.0, max_restarts=0)
    import json

    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "failed"
    config = json.loads((folder / "config.json").read_text())["config"]
    assert config["security"]["insecure"] is True


def foreign_messages(exp: Experiment) -> None:
    """A well-formed ACT from x9 to the server, and an ERROR to the controller's control
    socket from x9, over plain transport (so they get past the handshake)."""
    act = attacker(exp, b"x9")
    act.connect(exp.node_configs["srv"]["listen"])
    act.send_multipart(encode(Message("ACT", run=exp.run_id, round=1, sender="x9")))
    err = attacker(exp, b"x9")
    err.connect(exp.node_configs["srv"]["control"])
    err.send_multipart(encode(Message("ERROR", run=exp.run_id, sender="x9",
                                      meta={"error": "forged"})))
    time.sleep(0.5)


def test_foreign_messages_are_dropped_counted_and_change_nothing(undisturbed, tmp_path):
    _, calm_rounds, _ = undisturbed
    exp, rounds, summary = run(tmp_path, foreign_messages, insecure=True)
    assert losses(rounds) == losses(calm_rounds)
    assert summary["rejected"]["srv"]["unexpected_sender"] == 1, summary["rejected"]
    assert summary["rejected"]["controller"]["unexpected_sender"] == 1, summary["rejected"]


BIG = 200 << 20  # per stranger; six of them


def flood(exp: Experiment) -> None:
    """Six keyless strangers each send one 200 MiB frame to the server at once; the server's
    largest RSS while they do is kept on the Experiment."""
    srv = psutil.Process(exp.procs["srv"].pid)
    exp.rss_before = srv.memory_info().rss
    payload = bytes(BIG)
    socks = [attacker(exp, f"x{i}".encode()) for i in range(6)]
    for s in socks:
        s.setsockopt(zmq.SNDTIMEO, 5000)
        s.connect(exp.node_configs["srv"]["listen"])
    senders = [threading.Thread(target=s.send, args=(payload,), kwargs={"copy": False})
               for s in socks]
    for t in senders:
        t.start()
    peak, deadline = 0, time.monotonic() + 6.0
    while time.monotonic() < deadline:
        peak = max(peak, srv.memory_info().rss)
        time.sleep(0.05)
    for t in senders:
        t.join(10)
    exp.rss_peak = peak


@pytest.mark.parametrize("budget", ["derived", "raised"])
def test_many_big_frames_leave_the_server_within_its_budget(undisturbed, tmp_path, budget):
    """Derived budget: frames above the run's largest message are refused unread and the
    server's memory stays put, the run correct. Raised to 512 MiB (can-fail): it grows by
    what the strangers sent."""
    _, calm_rounds, _ = undisturbed
    over = {"insecure": True}  # so the frames get past the handshake at all
    if budget == "raised":
        over["max_message_bytes"] = 512 << 20
    exp, rounds, summary = run(tmp_path, flood, **over)
    grown = exp.rss_peak - exp.rss_before
    limit = exp.node_configs["srv"]["max_message_bytes"]
    assert losses(rounds) == losses(calm_rounds)
    if budget == "derived":
        assert limit < BIG
        assert grown < 2 * limit, (grown, limit)
    else:
        assert grown > 2 * BIG, grown
