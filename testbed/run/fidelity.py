"""Whether a round's numbers can be trusted: the host's idle CPU, the nodes' CPU, the relays'
lateness, and a verdict per round (ok | degraded | invalid) with its reasons.

Mininet-HiFi's rule (Handigol et al., CoNEXT 2012): an emulation is trusted only while the host
keeps enough idle CPU every second and the links keep their timing. `HostSampler` reads
/proc/stat once a second on its own thread; `Fidelity` snapshots the nodes' CPU time and
involuntary context switches (psutil) and the relays' lateness windows (testbed.emu.relay:
when each frame left against when the link model scheduled it) around every round, and judges
the round against the thresholds of the run's `fidelity` config section. It measures and
judges; it changes nothing in the run. docs/link-emulation.md explains each number.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import psutil

from testbed.emu.hostload import HostSampler
from testbed.plan.config import Fidelity as FidelityConfig

if TYPE_CHECKING:
    from testbed.run.experiment import Experiment


class Fidelity:
    """One run's monitor: start() once, begin_round() / end_round(record) around each round."""

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp
        self.cfg = exp.cfg.fidelity
        self.host = HostSampler()
        self._t0 = 0.0
        self._nodes: dict[str, tuple[float, int]] = {}

    def start(self) -> None:
        if self.cfg.monitor:
            self.host.start()

    def stop(self) -> None:
        self.host.stop()

    def _node_cpu(self) -> dict[str, tuple[float, int]]:
        out = {}
        for name, p in self.exp.procs.items():
            with contextlib.suppress(psutil.Error, AttributeError, ValueError):
                proc = psutil.Process(p.pid)
                t = proc.cpu_times()
                out[name] = (t.user + t.system, proc.num_ctx_switches().involuntary)
        return out

    def _links(self, backend: str) -> dict[str, Any]:
        links = getattr(self.exp.network, "links", None)
        if getattr(links, "name", None) != backend:
            return {}
        try:
            return links.stats(window=True)
        except OSError:  # a relay gone (its link torn down), a qdisc replaced: nothing to say
            return {}

    def _relays(self) -> dict[str, Any]:
        return self._links("relay")

    def begin_round(self) -> None:
        if not self.cfg.monitor:
            return
        self._t0 = self.host.snap()[0]
        self._nodes = self._node_cpu()
        self._relays()  # starts every relay's lateness window here
        self._links("netem")  # and every netem qdisc's counters

    def end_round(self) -> dict[str, Any] | None:
        """This round's measurements and verdict, for its record."""
        if not self.cfg.monitor:
            return None
        t1 = self.host.snap()[0]
        host = self.host.window(self._t0, t1)
        nodes = {}
        for n, (cpu, inv) in self._node_cpu().items():
            c0, i0 = self._nodes.get(n, (0.0, 0))
            nodes[n] = {"cpu_s": cpu - c0, "involuntary_ctx": inv - i0}
        relays = {}
        for link, st in self._relays().items():
            relays[link] = {"cpu_s": st.get("cpu_s"),
                            **{d: {**st[d]["lateness"],
                                   "dropped_queue": st[d]["dropped_queue"],
                                   "dropped_loss": st[d]["dropped_loss"],
                                   "delay_ms": st["params"][d]["delay_ms"]}
                               for d in ("up", "down")}}
        # netem keeps no per-frame lateness: its drops and backlog are reported, not judged
        qdiscs = {link: {d: st[d] for d in ("up", "down")}
                  for link, st in self._links("netem").items()}
        verdict, reasons = self.judge(host, relays)
        return {"verdict": verdict, "reasons": reasons, "host": host, "nodes": nodes,
                "relays": relays, **({"qdiscs": qdiscs} if qdiscs else {}),
                "mem_available_mb": psutil.virtual_memory().available / 2**20}

    def judge(self, host: dict[str, Any], relays: dict[str, Any]) -> tuple[str, list[str]]:
        """ok | degraded | invalid, and why. degraded: the host's idle CPU fell below
        min_idle in some second, or a relay's p99 lateness passed lateness_fraction of its
        link's delay (at least lateness_floor_ms); invalid: a relay's p99 lateness passed the
        link's whole delay (and the floor): the link's timing did not hold at all."""
        c = self.cfg
        degraded, invalid = host_reasons(host, c), []
        for link, r in relays.items():
            for d in ("up", "down"):
                p99, delay = r[d].get("p99_ms"), r[d]["delay_ms"]
                if p99 is None:
                    continue
                if p99 > max(delay, c.lateness_floor_ms):
                    invalid.append(f"relay {link} {d} p99 lateness {p99:.2f} ms > link delay "
                                   f"{delay:g} ms")
                elif p99 > max(c.lateness_fraction * delay, c.lateness_floor_ms):
                    degraded.append(f"relay {link} {d} p99 lateness {p99:.2f} ms > "
                                    f"{max(c.lateness_fraction * delay, c.lateness_floor_ms):g}"
                                    f" ms")
        if invalid:
            return "invalid", invalid + degraded
        return ("degraded", degraded) if degraded else ("ok", [])


VERDICTS = ("ok", "degraded", "invalid")  # from best to worst


def host_reasons(host: dict[str, Any], cfg: FidelityConfig) -> list[str]:
    """Mininet-HiFi's idle rule, the one rule rounds and benchmarks share: why the host's
    idle CPU (its lowest second) makes a measurement degraded, or nothing."""
    idle = host.get("idle_min")
    if idle is not None and idle < cfg.min_idle:
        return [f"host idle {idle * 100:.0f}% < {cfg.min_idle * 100:.0f}%"]
    return []


def overall(records: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """Several measurements' verdicts as one: the worst of them, its reasons (each once) and
    how many of each; a record without a verdict (monitor off) counts as "unknown"."""
    counts: dict[str, int] = {}
    reasons: list[str] = []
    for r in records:
        v = (r or {}).get("verdict", "unknown")
        counts[v] = counts.get(v, 0) + 1
        reasons += [x for x in (r or {}).get("reasons", []) if x not in reasons]
    judged = [v for v in VERDICTS if v in counts]
    return {"verdict": judged[-1] if judged else "unknown", "counts": counts,
            "reasons": reasons}


@contextlib.contextmanager
def watch_host(cfg: FidelityConfig | None = None) -> Iterator[dict[str, Any]]:
    """For a measurement outside a run (a benchmark's case): the host's idle CPU while the
    block ran, judged by the run's own rule (min_idle). The dict yielded is filled on exit:
    verdict, reasons, idle_min, idle_mean, run_queue_max."""
    cfg = cfg or FidelityConfig()
    sampler = HostSampler(period_s=0.5)
    t0 = sampler.snap()[0]
    sampler.start()
    out: dict[str, Any] = {}
    try:
        yield out
    finally:
        sampler.stop()
        host = sampler.window(t0, sampler.snap()[0])
        reasons = host_reasons(host, cfg)
        out.update(verdict="degraded" if reasons else "ok", reasons=reasons, **host)


def background(seconds: float = 2.0, cfg: FidelityConfig | None = None) -> dict[str, Any]:
    """The host's idle CPU over `seconds` of doing nothing, judged like a round: for a
    benchmark whose own work fills the cores (a transport stream, a compute round), whether
    something else was loading the host when it started."""
    import time

    with watch_host(cfg) as out:
        time.sleep(seconds)
    return out
