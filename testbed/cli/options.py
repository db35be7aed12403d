"""Command-line options that `sledge run` and `sledge compare` share (device heterogeneity,
compression, selection)."""

from __future__ import annotations

import argparse

from testbed.plan.config import RunConfig

HETEROGENEITY = {"cpu": "cpu", "mem_mb": "mem-mb", "cycles": "cycles"}  # field -> flag


def _add_device_args(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    p.add_argument("--cpu", dest="cpu_items", action="append", default=[], metavar="HOST=FRAC",
                   help="CPU share of a host or role, a fraction of the whole machine (cgroup "
                        "quota, Mininet's cpu), e.g. --cpu c1=0.1 --cpu client=0.2")
    p.add_argument("--mem-mb", dest="mem_mb_items", action="append", default=[],
                   metavar="HOST=MIB", help="memory limit of a host or role (cgroup v1 memcg)")
    p.add_argument("--cycles", dest="cycles_items", action="append", default=[],
                   metavar="HOST=CYCLES", help="modelled compute speed of a host or role in "
                   "cycles/s, e.g. --cycles client=0.3e9 --cycles server=7e9: compute is padded "
                   "to FLOPs / (flops-per-cycle * cycles)")
    p.add_argument("--flops-per-cycle", type=float, default=d.flops_per_cycle)
    # docs/compression.md
    p.add_argument("--compress", dest="compress_items", action="append", default=[],
                   metavar="KEY=VALUE", help="cut compression, e.g. --compress method=c3sl "
                   "--compress R=4 (topk: rho=, quant: bits=, qgroup=, stochastic=)")
    p.add_argument("--client-bits", dest="client_bits_items", action="append", default=[],
                   metavar="HOST=BITS", help="low-precision weights of a client or role, e.g. "
                   "--client-bits client=8")
    p.add_argument("--client-prune", dest="client_prune_items", action="append", default=[],
                   metavar="HOST=FRAC", help="magnitude-pruned weights of a client or role")
    p.add_argument("--select", dest="select_items", action="append", default=[],
                   metavar="KEY=VALUE", help="client selection per round, e.g. --select "
                   "policy=rpowd --select m=2 --select d=3 [--select deadline_s=1.5]")
    p.add_argument("--backward-flops-factor", type=float, default=d.backward_flops_factor)
