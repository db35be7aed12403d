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

    @property
    def link_backend(self) -> str:
        return "netem" if self.netem else "relay"

    def mechanisms(self) -> dict[str, str]:
        """Which mechanism emulates each link parameter."""
        if self.netem:
            return {"bw": "htb", "delay": "netem", "jitter": "netem", "loss": "netem",
                    "max_queue_size": "netem"}
        relay = "relay (user-space, a node in the middle of each shaped link)"
        return dict.fromkeys(("bw", "delay", "jitter", "loss", "max_queue_size"), relay)

    def to_dict(self) -> dict:
        return {**asdict(self), "switch": self.switch, "link_backend": self.link_backend,
                "mechanisms": self.mechanisms()}

    def describe(self) -> list[str]:
        lines = [
            f"switch: {'Open vSwitch' if self.ovs else 'Linux bridge (no controller)'}",
            f"link emulation: {self.mechanisms()['delay']}" if not self.netem else
            "link emulation: bw via htb; delay, jitter, loss, queue via netem",
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
            "this kernel has no netem: every shaped link gets a user-space relay node "
            "(testbed.emu.relay) that applies rate, queue, delay, jitter and loss."
        )
    return Capabilities(
        netem=netem,
        ovs=_ovs_works(),
        cgroup_cpu=os.path.isdir("/sys/fs/cgroup/cpu"),
        cgroup_memory=os.path.isdir("/sys/fs/cgroup/memory"),
        notes=tuple(notes),
    )
