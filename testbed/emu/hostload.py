"""How busy the host is: the machine's idle CPU share and run queue, sampled once a second.

An emulation on one host is only as faithful as the CPU it gets (Mininet-HiFi: at least 35 %
idle every second). `HostSampler` reads /proc/stat on a thread of its own; `window(t0, t1)`
gives the lowest and the mean idle share over that time. It judges nothing (the run's
fidelity monitor and linkcheck do).
"""

from __future__ import annotations

import threading
import time
from typing import Any


def cpu_times() -> tuple[float, float, int]:
    """(idle, total) jiffies of the whole machine and the run queue (procs_running)."""
    idle = total = 0.0
    running = 0
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                v = [float(x) for x in line.split()[1:]]
                idle, total = v[3] + v[4], sum(v[:8])  # idle + iowait; guest is in user
            elif line.startswith("procs_running"):
                running = int(line.split()[1])
    return idle, total, running


class HostSampler(threading.Thread):
    """The machine's CPU counters once a second: (time, idle, total, run queue)."""

    def __init__(self, period_s: float = 1.0) -> None:
        super().__init__(name="fidelity host sampler", daemon=True)
        self.period_s = period_s
        self.samples: list[tuple[float, float, float, int]] = []
        self.lock = threading.Lock()
        self._stop_evt = threading.Event()

    def snap(self) -> tuple[float, float, float, int]:
        s = (time.monotonic(), *cpu_times())
        with self.lock:
            self.samples.append(s)
            del self.samples[:-4096]  # an hour of seconds is plenty
        return s

    def run(self) -> None:
        while not self._stop_evt.wait(self.period_s):
            self.snap()

    def stop(self) -> None:
        self._stop_evt.set()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """Idle fraction over [t0, t1]: the lowest over its ~1-second steps and the mean."""
        with self.lock:
            s = [x for x in self.samples if t0 <= x[0] <= t1]
        steps = []
        for a, b in zip(s, s[1:], strict=False):
            if b[0] - a[0] >= 0.2 and b[2] > a[2]:  # a sliver at the end says nothing
                steps.append((b[1] - a[1]) / (b[2] - a[2]))
        mean = (s[-1][1] - s[0][1]) / (s[-1][2] - s[0][2]) if len(s) > 1 and \
            s[-1][2] > s[0][2] else None
        return {"idle_min": min(steps) if steps else mean, "idle_mean": mean,
                "run_queue_max": max((x[3] for x in s), default=None), "windows": len(steps)}
