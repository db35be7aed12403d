"""Device heterogeneity over real Mininet hosts: a node runs inside its host's cgroups (CPU
quota, memory limit) under both launchers, a CPU quota slows the round, a memory limit kills
the node that exceeds it (the run fails naming it and leaves nothing behind), and modelled
compute makes compute time follow the configured cycles/s."""

from __future__ import annotations

import glob
import json
import os

import pytest

from testbed import Experiment
from testbed.emu.network import CGROUP_ROOT, own_cgroup
from testbed.emu.topology import load_topology
from testbed.errors import RunFailed
from testbed.plan.config import RunConfig
from testbed.run.records import read_rounds

pytestmark = pytest.mark.net
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "topologies", "tiny.py")
BATCH, ITERS = 32, 30
CLIENT_MACS = 18432 + 294912  # smallcnn on 8x8 digits, conv1 + conv2 (the client's segment)


def tiny_with(declared: dict[str, dict] | None = None):
    """topologies/tiny.py whose hosts declare resources as topology data, as
    addHost("c1", role="client", cpu=0.25) would."""
    topo, _ = load_topology(TINY)
    for host, params in (declared or {}).items():
        topo.nodeInfo(host).update(params)
    return topo


def run(tmp_path, topo, on_round=None, **cfg):
    base = dict(name="het", dataset="digits", rounds=1, iters_per_round=ITERS,
                batch_size=BATCH, train_limit=None, test_limit=None, evaluate=False,
                out_dir=str(tmp_path))
    exp = Experiment(RunConfig.from_dict({**base, **cfg}), topo, topology=TINY,
                     on_round=on_round)
    exp.run()
    return exp, read_rounds(exp.run_dir.path)


def cgroups_present() -> set[str]:
    """Every cgroup a run could create: Mininet's per-host cpu groups and our memory groups."""
    dirs = set()
    for c in ("cpu", "cpuacct", "cpuset"):
        dirs |= {d for d in glob.glob(os.path.join(CGROUP_ROOT, c, "*")) if os.path.isdir(d)}
    return dirs | set(glob.glob(os.path.join(own_cgroup("memory"), "sledge-*")))


def membership(exp) -> dict[str, dict]:
    """While the nodes run: each node's cgroup per controller, and its host's limit files."""
    out = {}
    for name, p in exp.procs.items():
        with open(f"/proc/{p.pid}/cgroup") as f:
            groups = {ctl: path for _, ctls, path in (ln.strip().split(":", 2) for ln in f)
                      for ctl in ctls.split(",")}
        out[name] = {"groups": groups, "host_cgroups": exp.network.host(name).cgroup_dirs()
                     if hasattr(exp.network.host(name), "cgroup_dirs") else []}
        for path in out[name]["host_cgroups"]:
            for leaf in ("cpu.cfs_quota_us", "cpu.cfs_period_us", "cpu.stat",
                         "memory.limit_in_bytes", "cgroup.procs"):
                if os.path.exists(os.path.join(path, leaf)):
                    with open(os.path.join(path, leaf)) as f:
                        out[name][leaf] = f.read().split()
    return out


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    """A run per launcher with c1 CPU-limited and c2 memory-limited, one declaring the
    limits in the topology and one as run-level overrides; and an unlimited zygote run."""
    out = {}
    for launcher, declared, override in (
            ("popen", {"c1": {"cpu": 0.25}, "c2": {"mem_mb": 1024}}, {}),
            ("zygote", {}, {"cpu": {"c1": 0.05}, "mem_mb": {"c2": 1024}})):
        seen = {}
        before = cgroups_present()
        exp, rounds = run(tmp_path_factory.mktemp(launcher), tiny_with(declared),
                          on_round=lambda e, r, seen=seen: seen.update(membership(e)),
                          launcher=launcher, **override)
        out[launcher] = exp, rounds, seen, cgroups_present() - before
    out["unlimited"] = run(tmp_path_factory.mktemp("free"), tiny_with(), launcher="zygote")
    return out


@pytest.mark.parametrize(("launcher", "frac"), [("popen", 0.25), ("zygote", 0.05)])
def test_limited_nodes_run_in_their_hosts_cgroups_with_the_declared_limits(limited, launcher,
                                                                          frac):
    exp, _, seen, left = limited[launcher]
    assert not left  # Mininet's cpu groups and our memory groups are gone with the net
    c1, c2, srv = seen["c1"], seen["c2"], seen["srv"]
    assert c1["groups"]["cpu"] == "/c1" and c1["groups"]["cpuacct"] == "/c1"
    period = int(c1["cpu.cfs_period_us"][0])
    assert int(c1["cpu.cfs_quota_us"][0]) == int(period * frac * os.cpu_count())
    assert str(exp.procs["c1"].pid) in c1["cgroup.procs"]
    assert c2["groups"]["memory"].endswith(f"/sledge-{os.getpid()}-c2")
    assert c2["memory.limit_in_bytes"] == [str(1024 << 20)]
    assert str(exp.procs["c2"].pid) in c2["cgroup.procs"]
    assert c2["cpu.cfs_quota_us"] == ["-1"]  # a memory limit alone leaves the CPU free
    assert srv["host_cgroups"] == [] and srv["groups"]["cpu"] == "/"
    hosts = json.loads((exp.run_dir.path / "config.json").read_text())["hosts"]
    assert hosts["c1"]["cpu"] == frac and hosts["c2"]["mem_limit_bytes"] == 1024 << 20


def test_a_client_at_five_percent_cpu_makes_the_round_measurably_slower(limited):
    _, slow, seen, _ = limited["zygote"]
    _, free = limited["unlimited"]
    assert slow[0]["wall_s"] > 1.5 * free[0]["wall_s"]
    # The same work, and the kernel says it held c1 back. (c1's compute time alone is no
    # measure: its quota refills while it waits for the server, so a short compute burst
    # may or may not meet the throttle.)
    c1s, c1f = slow[0]["nodes"]["c1"], free[0]["nodes"]["c1"]
    assert c1s["flops"] == c1f["flops"]
    stat = dict(zip(seen["c1"]["cpu.stat"][::2], map(int, seen["c1"]["cpu.stat"][1::2]),
                    strict=True))
    assert stat["nr_throttled"] > 0 and stat["throttled_time"] > 0


def test_memory_limit_kills_the_node_that_exceeds_it_and_the_run_names_it(tmp_path, no_leaks):
    before = cgroups_present()
    # A fresh interpreter importing torch needs ~200 MiB: 100 MiB cannot hold it.
    with pytest.raises(RunFailed, match=r"node c1 was killed by the kernel's OOM killer: it "
                                        r"exceeded host c1's memory limit of 100 MiB"):
        run(tmp_path, tiny_with({"c1": {"mem_mb": 100}}), launcher="popen")
    assert cgroups_present() == before


def test_modelled_compute_follows_the_configured_cycles_per_second(tmp_path, no_leaks):
    f, eta, beta = 1e9, 2.0, 2.0
    exp, rounds = run(tmp_path, tiny_with(), launcher="zygote", iters_per_round=10,
                      cycles={"c1": f, "c2": f / 2, "server": 7e9}, flops_per_cycle=eta,
                      backward_flops_factor=beta)
    nodes = rounds[0]["nodes"]
    flops = 10 * BATCH * 2 * CLIENT_MACS * (1 + beta)  # forward, then beta x for backward
    for c, rate in (("c1", f), ("c2", f / 2)):
        n = nodes[c]
        assert n["flops"] == flops and n["cycles_per_s"] == rate
        assert n["compute_modelled_s"] == pytest.approx(flops / (eta * rate))
        assert n["compute_measured_s"] < n["compute_modelled_s"] <= n["compute_s"]
    # Halving cycles/s doubles the client's compute time (the padding dominates).
    assert nodes["c2"]["compute_s"] / nodes["c1"]["compute_s"] == pytest.approx(2, rel=0.15)
    # A 7 GHz server is faster than this CPU: its compute is what it measured.
    assert nodes["srv"]["compute_modelled_s"] < nodes["srv"]["compute_s"]
    assert exp.node_configs["srv"]["compute"]["cycles_per_s"] == 7e9
