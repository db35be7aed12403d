"""Modelled compute without a network: FLOPs counted per unit as forward and backward run,
compute blocks padded to FLOPs / (eta * f), run-level values resolved per host."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from nodes.context import ComputeModel
from nodes.runtime import build_context
from testbed.cli.main import build_parser, prepared
from testbed.emu.topology import load_topology
from testbed.errors import ConfigError
from testbed.plan.config import RunConfig
from testbed.plan.runplan import PlanError, per_host

TINY = os.path.join(os.path.dirname(os.path.dirname(__file__)), "topologies", "tiny.py")
B = 16
MACS = {"conv1": 18432, "conv2": 294912, "fc1": 32768, "fc2": 1280}  # smallcnn, 8x8


def context(segments: list[int], compute: dict | None = None):
    cfg = {"name": "n", "role": "client", "run": "r", "scheme": "psl", "cuts": ["conv2"],
           "model": {"name": "smallcnn", "num_classes": 10, "in_channels": 1, "image_size": 8},
           "segments": segments, "control": "ipc://unused", "roles": {"client": ["n"]},
           "compute": compute or {}}
    return build_context(cfg, None)


def test_flops_are_two_macs_per_sample_forward_and_beta_times_that_backward():
    ctx = context([0], {"backward_flops_factor": 3.0})
    x = torch.randn(B, 1, 8, 8)
    with ctx.compute():
        out = ctx.model()(x)
    fwd = 2 * B * (MACS["conv1"] + MACS["conv2"])
    assert ctx.flops == fwd
    with ctx.compute():
        out.sum().backward()
    assert ctx.flops == fwd * 4
    with torch.no_grad():  # no graph, no backward to come
        ctx.model()(x[:4])
    assert ctx.flops == fwd * 4 + fwd / 4


def test_server_copies_count_into_the_same_node():
    ctx = context([1])
    twin = copy.deepcopy(ctx.model())
    twin(torch.randn(B, 64, 2, 2)).sum().backward()
    assert ctx.flops == 2 * B * (MACS["fc1"] + MACS["fc2"]) * 3


def test_compute_block_is_padded_to_the_modelled_time_and_reports_both():
    ctx = context([0], {"cycles_per_s": 1e8, "flops_per_cycle": 1.0})
    with ctx.compute():
        ctx.model()(torch.randn(B, 1, 8, 8)).sum().backward()
    modelled = 2 * B * (MACS["conv1"] + MACS["conv2"]) * 3 / 1e8
    assert ctx.compute_modelled_s == pytest.approx(modelled)
    assert ctx.compute_measured_s < modelled <= ctx.compute_s < modelled + 0.05
    report = ctx.round_report()
    assert report["cycles_per_s"] == 1e8 and report["compute_modelled_s"] == ctx.compute_modelled_s
    ctx.reset_round()
    assert ctx.flops == ctx.compute_s == ctx.compute_modelled_s == 0


def test_nested_compute_blocks_count_once():
    ctx = context([0], {"cycles_per_s": 1e9})
    with ctx.compute(), ctx.compute():
        ctx.model()(torch.randn(B, 1, 8, 8))
    assert ctx.compute_modelled_s == pytest.approx(2 * B * 313344 / 1e9)


def test_without_a_rate_compute_is_measured_only():
    ctx = context([0])
    with ctx.compute():
        ctx.model()(torch.randn(B, 1, 8, 8))
    assert ctx.compute_model is None and "compute_modelled_s" not in ctx.round_report()
    assert ctx.compute_s == ctx.compute_measured_s > 0


def test_compute_model_seconds_is_flops_over_eta_f():
    assert ComputeModel(0.5e9, 16).seconds(8e9) == 1.0


def test_run_level_values_override_the_topology_host_first_then_role():
    topo, _ = load_topology(TINY, params={"clients": 3})
    topo.nodeInfo("c3")["cpu"] = 0.3  # declared by the topology
    assert per_host(topo, "cpu", {}) == {"c3": 0.3}
    assert per_host(topo, "cpu", {"client": 0.2, "c1": 0.1}) == {"c1": 0.1, "c2": 0.2,
                                                                  "c3": 0.2}
    with pytest.raises(PlanError, match=r"'cycles'.*\['c9'\] is neither a host nor a role"):
        per_host(topo, "cycles", {"c9": 1e9})


@pytest.mark.parametrize(("field", "value"), [("cpu", {"c1": 1.5}), ("cpu", {"c1": 0}),
                                              ("mem_mb", {"c1": 0.5}), ("cycles", {"c1": -1}),
                                              ("flops_per_cycle", 0)])
def test_bad_heterogeneity_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"'devices[.]{field}"):
        RunConfig.from_dict({field: value})


def test_cli_flags_set_heterogeneity_per_host_or_role():
    a = build_parser().parse_args(["run", TINY, "--cpu", "c1=0.1", "--mem-mb", "client=256",
                                   "--cycles", "server=7e9", "--flops-per-cycle", "16"])
    cfg = prepared(a).cfg
    assert (cfg.devices.cpu, cfg.devices.mem_mb, cfg.devices.cycles) == (
        {"c1": 0.1}, {"client": 256}, {"server": 7e9})
    assert cfg.devices.flops_per_cycle == 16
