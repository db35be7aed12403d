"""What this kernel and machine offer for emulation, probed once at start-up.

The probe decides which mechanism emulates each link parameter and which switch class
builds the network; every run prints the result and stores it with its config, so a
number measured here can be read knowing what produced it. Nothing here changes the
machine: netem is tried inside a throw-away network namespace (`unshare -n`) that
vanishes with its process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from functools import lru_cache


@dataclass(frozen=True)
class Capabilities:
    netem: bool
    ovs: bool
    cgroup_cpu: bool
    cgroup_memory: bool
    notes: tuple[str, ...] = field(default=())

    @property
    def switch(self) -> str:
        return "ovs" if self.ovs else "linuxbridge"

    def mechanisms(self) -> dict[str, str]:
        """Which mechanism emulates each link parameter ('none' means not applied)."""
        impaired = "netem" if self.netem else "none"
        return {
            "bw": "htb",
            "delay": impaired,
            "jitter": impaired,
            "loss": impaired,
            "max_queue_size": impaired,
        }

    def to_dict(self) -> dict:
        return {**asdict(self), "switch": self.switch, "mechanisms": self.mechanisms()}

    def describe(self) -> list[str]:
        lines = [
            f"switch: {'Open vSwitch' if self.ovs else 'Linux bridge (no controller)'}",
            "link parameters: "
            + ", ".join(f"{k} via {v}" for k, v in self.mechanisms().items()),
            f"cgroups v1: cpu={'yes' if self.cgroup_cpu else 'no'} "
            f"memory={'yes' if self.cgroup_memory else 'no'}",
        ]
        return lines + list(self.notes)


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)


def _netem_works() -> bool:
    # A private, anonymous netns: the qdisc and the namespace die with `unshare`.
    if not (shutil.which("unshare") and shutil.which("tc")):
        return False
    r = _run(["unshare", "-n", "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
    return r.returncode == 0


def _ovs_works() -> bool:
    # The userspace tools are not enough: the datapath needs the kernel module.
    if not shutil.which("ovs-vsctl") or not os.path.isdir("/sys/module/openvswitch"):
        return False
    return _run(["ovs-vsctl", "--timeout=3", "show"]).returncode == 0


@lru_cache(maxsize=1)
def probe() -> Capabilities:
    netem = _netem_works()
    notes = []
    if not netem:
        notes.append(
            "WARNING: this kernel has no netem: link delay, jitter, loss and queue limits "
            "are NOT applied (bandwidth is, through htb)."
        )
    return Capabilities(
        netem=netem,
        ovs=_ovs_works(),
        cgroup_cpu=os.path.isdir("/sys/fs/cgroup/cpu"),
        cgroup_memory=os.path.isdir("/sys/fs/cgroup/memory"),
        notes=tuple(notes),
    )
