"""The comparison's definitions on hand-made rounds: critical-path compute (max over clients,
or their sum when they take turns), communication as the rest of the round, up and down as
what the clients send and receive, a broadcast counted once, the seed's device speeds."""

from __future__ import annotations

import os

import pytest

from testbed.emu.topology import load_topology
from testbed.errors import ConfigError
from testbed.report.compare import parse_spec, round_metrics, seed_speeds, summary_row

TINY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "topologies", "tiny.py")


def record(acc: float = 0.5) -> dict:
    node = {"c1": (1.0, 100, 40, 10), "c2": (3.0, 100, 40, 10), "srv": (0.5, 80, 200, 0)}
    return {"round": 1, "wall_s": 6.0, "test_acc": acc, "train_loss": 1.0,
            "nodes": {n: {"compute_s": c, "tx_bytes": tx, "rx_bytes": rx,
                          "by_type": {"GRAD_BCAST.rx": b}} for n, (c, tx, rx, b) in node.items()},
            "interfaces": {"c1-eth0": {"tx_bytes": 150, "rx_bytes": 60},
                           "c2-eth0": {"tx_bytes": 150, "rx_bytes": 60},
                           "srv-eth0": {"tx_bytes": 999, "rx_bytes": 999}}}


def test_parallel_clients_put_the_slowest_on_the_critical_path():
    m = round_metrics(record(), ["c1", "c2"], sequential=False)
    assert m["compute_s"] == 3.5 and m["comm_s"] == 2.5
    assert (m["up_bytes"], m["down_bytes"]) == (200, 80)
    assert (m["wire_up_bytes"], m["wire_down_bytes"]) == (300, 120)
    assert m["down_bcast_once_bytes"] == 80 - 20 + 10


def test_clients_taking_turns_add_their_compute():
    m = round_metrics(record(), ["c1", "c2"], sequential=True)
    assert m["compute_s"] == 4.5 and m["comm_s"] == 1.5


def test_time_to_target_accuracy_is_the_wall_time_of_the_first_round_reaching_it():
    rounds = [round_metrics(record(a), ["c1", "c2"], False) for a in (0.5, 0.85, 0.9)]
    row = summary_row("PSL", rounds, 0.8)
    assert row["time_to_target_s"] == 12.0 and row["final_acc"] == 0.9
    assert summary_row("PSL", rounds, 0.95)["time_to_target_s"] is None


def test_scheme_specs_carry_options_and_bad_ones_are_named():
    s = parse_spec("epsl:phi=0.5")
    assert (s.scheme, s.options, s.label) == ("epsl", {"phi": 0.5}, "EPSL phi=0.5")
    assert s.slug == "epsl-phi0_5"
    with pytest.raises(ConfigError, match="phi"):
        parse_spec("epsl:phi=2")
    with pytest.raises(ConfigError, match="unknown"):
        parse_spec("nosuch")


def test_seed_speeds_spread_clients_over_a_tenth_to_half_a_gigahertz():
    topo, _ = load_topology(TINY, params={"clients": 5, "fed": True})
    assert seed_speeds(topo) == pytest.approx(
        {"c1": 1e8, "c2": 2e8, "c3": 3e8, "c4": 4e8, "c5": 5e8, "server": 7e9,
         "fedserver": 7e9})
