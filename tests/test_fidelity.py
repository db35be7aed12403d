"""The fidelity verdict outside a run: `overall` folds several verdicts into the worst one,
and `watch_host` (what benchmarks wrap their cases in) judges a block by the host's idle CPU
with the run's own rule: a busy loop on every core the test starts turns it degraded."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from testbed.plan.config import Fidelity
from testbed.run.fidelity import overall, watch_host

# Ends by itself after 4 s whatever happens to the test.
HOG = "import time\nend = time.monotonic() + 4\nwhile time.monotonic() < end: pass\n"


def test_overall_is_the_worst_verdict_with_every_reason_once():
    got = overall([{"verdict": "ok", "reasons": []},
                   {"verdict": "degraded", "reasons": ["host idle 7% < 35%"]},
                   None,
                   {"verdict": "degraded", "reasons": ["host idle 7% < 35%", "relay x"]}])
    assert got == {"verdict": "degraded", "counts": {"ok": 1, "degraded": 2, "unknown": 1},
                   "reasons": ["host idle 7% < 35%", "relay x"]}
    assert overall([{"verdict": "invalid"}, {"verdict": "ok"}])["verdict"] == "invalid"
    assert overall([None])["verdict"] == "unknown"


def test_watch_host_says_degraded_while_every_core_is_busy_and_ok_when_idle():
    with watch_host() as quiet:
        time.sleep(2.5)
    procs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)  # the interpreters start
        with watch_host() as busy:
            time.sleep(2.5)
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert quiet["verdict"] == "ok" and quiet["reasons"] == [], quiet
    assert quiet["idle_min"] >= Fidelity().min_idle and quiet["windows"] >= 3
    assert busy["verdict"] == "degraded", busy
    assert busy["reasons"][0].startswith("host idle") and busy["idle_min"] < 0.35
    # the threshold is the config's: allowing any idle share makes the busy block ok
    with watch_host(Fidelity(min_idle=0.0)) as lax:
        time.sleep(1.2)
    assert lax["verdict"] == "ok"
