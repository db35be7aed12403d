"""The link model and traces: parsing, presets and errors that name what is wrong."""

from __future__ import annotations

import pytest

from testbed.emu.linkcheck import expected_path
from testbed.emu.linkmodel import LinkParams, preset
from testbed.emu.links import load_trace


def test_mininet_vocabulary_maps_to_the_model_per_direction():
    p = LinkParams.from_mininet(bw=10, delay="5ms", loss=2, bw_up=3)
    assert p.up.bw_mbit == 3 and p.down.bw_mbit == 10
    assert p.up.delay_ms == p.down.delay_ms == 5
    assert p.up.loss == pytest.approx(0.02)


def test_bad_link_parameters_name_the_field():
    with pytest.raises(ValueError, match="bandwidth"):
        LinkParams.from_mininet(bandwidth=10)
    with pytest.raises(ValueError, match="loss"):
        LinkParams.from_mininet(loss=150)


def test_presets_are_asymmetric_where_the_medium_is():
    cell = preset("cellular")
    assert cell.up.bw_mbit < cell.down.bw_mbit
    assert preset("cellular", delay="20ms").up.delay_ms == 20
    with pytest.raises(ValueError, match="nope"):
        preset("nope")


def test_trace_rows_are_sorted_and_validated(tmp_path):
    good = tmp_path / "t.csv"
    good.write_text("time_s,bw,delay\n2,5,10ms\n0,50,1ms\n")
    assert [t for t, _ in load_trace(str(good))] == [0.0, 2.0]
    bad = tmp_path / "b.csv"
    bad.write_text("time_s,bw\n0,10\n1,-5\n")
    with pytest.raises(ValueError, match="line 3"):
        load_trace(str(bad))
    with pytest.raises(ValueError, match="time_s"):
        (tmp_path / "c.csv").write_text("t,bw\n0,1\n")
        load_trace(str(tmp_path / "c.csv"))


def test_expected_path_adds_delays_both_ways_and_takes_the_slowest_rate():
    declared = [("c1", "s1", LinkParams.from_mininet(bw=10, delay="5ms", bw_down=20)),
                ("srv", "s1", LinkParams.from_mininet(bw=100, delay="1ms", loss=10))]
    e = expected_path(declared, "c1", "srv")
    assert e["path"] == ["c1", "s1", "srv"]
    # 12 ms of propagation plus a 98-byte ping frame serialised on each rate-limited hop.
    ser = 98 * 8 / 1e3 * (1 / 10 + 1 / 20 + 2 / 100)
    assert e["rtt_ms"] == pytest.approx(12.0 + ser)
    assert e["bw_mbit"] == 10
    assert e["rtt_loss"] == pytest.approx(1 - 0.9 * 0.9)


def test_one_translation_to_tc_for_declaration_netem_and_changes():
    """Declaring a link (to_mininet), building it with netem (tc_kwargs) and changing it at run
    time (netem_args) read the same fields the same way: queue in packets rounded up, delay
    and loss in one format, and back through from_mininet to the same model."""
    p = LinkParams.from_mininet(bw=10, delay="2.5ms", jitter="1ms", loss=1.5,
                                max_queue_size=3, bw_down=20)
    p = LinkParams.from_dict({**p.to_dict(), "up": {**p.up.to_dict(), "queue_bytes": 3001}})
    up = p.up.tc_kwargs(always_delay=True)
    assert up == {"bw": 10, "delay": "2.5ms", "jitter": "1ms", "loss": 1.5,
                  "max_queue_size": 3}                 # 3001 bytes: 3 packets of 1500, rounded up
    assert p.up.netem_args() == "delay 2.5ms 1ms loss 1.50000% limit 3"
    assert p.to_mininet()["max_queue_size"] == up["max_queue_size"]  # down: 4500 B, also 3
    quiet = LinkParams.from_mininet(bw=5).up
    assert "delay" not in quiet.tc_kwargs() and quiet.tc_kwargs(always_delay=True)["delay"] == "0ms"
    assert quiet.netem_args() == "delay 0ms 0ms loss 0.00000%"
    again = LinkParams.from_mininet(**LinkParams.from_mininet(**p.to_mininet()).to_mininet())
    assert again.to_mininet() == p.to_mininet()


@pytest.mark.parametrize("backend", ["netem", "relay"])
def test_a_backend_builds_its_own_links_and_leaves_the_declared_topology_as_it_was(backend):
    """The scenario's plan, the routing and the report read link parameters from the run's
    topology; the netem backend used to pop them from it (found in the guest: a planned
    set_link's delay read 0 where the link had 2 ms)."""
    from testbed.emu.links import NetemBackend, RelayBackend
    from testbed.emu.topolib import Topo

    topo = Topo()
    for h in ("h1", "h2"):
        topo.addHost(h)
    topo.addSwitch("s1")
    topo.addLink("h1", "s1", bw=10, delay="2ms")
    topo.addLink("s1", "h2")
    before = [dict(i) for _, _, i in topo.links(sort=True, withInfo=True)]
    b = NetemBackend() if backend == "netem" else RelayBackend()
    built = b.prepare(topo)
    assert [dict(i) for _, _, i in topo.links(sort=True, withInfo=True)] == before
    assert built is not topo and b.params[("h1", "s1")].up.delay_ms == 2.0
    if backend == "netem":  # TCLink's per-interface parameters, on the built copy only
        info = built.linkInfo("h1", "s1")
        assert info["params1"]["delay"] == "2ms" and "delay" not in info
