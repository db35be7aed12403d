"""The schemes side by side, read back from their run folders (nothing is measured here).

`sledge compare` (testbed.cli.compare) runs each scheme as one Experiment, one after another,
into <out>/<time>-compare/runs/; this module reads those run folders and writes compare.md
and compare.csv (one row per scheme), rounds.csv (one row per scheme and
round) and plots (matplotlib, Agg): accuracy.png (vs round and vs wall time), bytes.png (up and
down per round) and latency.png (per-round latency split into compute and communication).

Definitions, also printed under the table:
- up / down: what the clients send / receive per round. Protocol bytes are the nodes' own
  counters (payload and headers); wire bytes are the client hosts' interface counters
  (TCP/IP and retransmissions included). The ZeroMQ star carries a broadcast (EPSL's
  GRAD_BCAST) as one copy per client; "down, bcast once" counts it once, as a broadcast
  medium would carry it.
- compute: critical-path compute per round = the slowest client's compute time (the sum over
  the clients when they take turns, as in vanilla SL) + the compute time of every other node
  (server, fed server). It assumes server compute does not overlap client compute: true for
  SL, PSL and EPSL, an upper bound for SFL's first-come-first-served server and for FL.
- communication = wall time - compute, floored at 0: transfers, queueing and waiting.
Device speeds default to the seed's setup by ratio (algorithms.md 12): clients spread evenly
over 0.1-0.5 GHz in host order, servers 7 GHz, at eta = 16 FLOPs/cycle (11.2's SIMD value).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodes.schemes import get_scheme
from testbed.emu.topology import parse_params
from testbed.errors import ConfigError
from testbed.run.records import read_rounds, round_metrics

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TOPOLOGY = "topologies/cellular.py"
DEFAULT_SCHEMES = ("fl", "sl", "sflv1", "sflv2", "psl", "epsl,phi=0.5", "epsl,phi=1")
MIB = 1 << 20


@dataclass
class Spec:
    """One scheme to run: name, options, how it is labelled and what its run is called."""

    scheme: str
    options: dict[str, Any]
    label: str
    slug: str


def parse_spec(text: str) -> Spec:
    """SCHEME[,KEY=VALUE,...] (the run's spec syntax), e.g. "epsl,phi=0.5"; "epsl:phi=0.5"
    as well."""
    head, colon, rest = text.strip().partition(":")
    name, *opts = [head, *rest.split(",")] if colon else text.strip().split(",")
    options = parse_params([o for o in opts if o], "--schemes")
    try:
        scheme = get_scheme(name, **options)
    except ValueError as e:
        raise ConfigError(f"--schemes {text!r}: {e}") from None
    # as the scheme names itself (its label), with the options given
    label = " ".join([scheme.label or name] + [f"{k}={v}" for k, v in options.items()])
    slug = re.sub(r"[^A-Za-z0-9_-]", "_", "-".join([name] + [f"{k}{v}" for k, v in
                                                             options.items()]))
    return Spec(name, options, label, slug)


def seed_speeds(topo: Any) -> dict[str, float]:
    """Cycles/s by the seed's setup: clients evenly over 0.1-0.5 GHz, servers 7 GHz."""
    roles = {h: topo.nodeInfo(h).get("role") for h in topo.hosts()}
    clients = [h for h in topo.hosts(sort=True) if roles[h] == "client"]
    out = {c: (0.1 + 0.4 * i / max(len(clients) - 1, 1)) * 1e9 for i, c in enumerate(clients)}
    out.update({r: 7e9 for r in ("server", "fedserver") if r in roles.values()})
    return out


# -- analysis of finished runs (from their folders) ------------------------------------------
def analyse_run(run_dir: str | Path) -> list[dict[str, Any]]:
    config = json.loads((Path(run_dir) / "config.json").read_text())
    spec = config["config"]["scheme"]
    scheme = get_scheme(spec["name"], **spec["options"])
    clients = config["roles"]["client"]
    return [round_metrics(r, clients, scheme.sequential_clients) for r in read_rounds(run_dir)]


def summary_row(label: str, rounds: list[dict], target: float) -> dict[str, Any]:
    def mean(key: str) -> float:
        return sum(r[key] for r in rounds) / len(rounds)

    elapsed, reached = 0.0, None
    for r in rounds:
        elapsed += r["wall_s"]
        if reached is None and (r["test_acc"] or 0) >= target:
            reached = elapsed
    accs = [r["test_acc"] for r in rounds if r["test_acc"] is not None]
    return {"scheme": label, "rounds": len(rounds),
            "final_acc": accs[-1] if accs else None, "best_acc": max(accs, default=None),
            "time_to_target_s": reached, "total_wall_s": elapsed,
            "round_s": mean("wall_s"), "compute_s": mean("compute_s"), "comm_s": mean("comm_s"),
            "up_mib": mean("up_bytes") / MIB, "down_mib": mean("down_bytes") / MIB,
            "down_bcast_once_mib": mean("down_bcast_once_bytes") / MIB,
            "wire_up_mib": mean("wire_up_bytes") / MIB,
            "wire_down_mib": mean("wire_down_bytes") / MIB, "status": "ok"}


COLUMNS = [("scheme", "scheme", "{}"), ("rounds", "rounds", "{}"),
           ("final_acc", "final acc", "{:.1%}"), ("best_acc", "best acc", "{:.1%}"),
           ("time_to_target_s", "time to {target:.0%} (s)", "{:.1f}"),
           ("round_s", "round (s)", "{:.2f}"), ("compute_s", "compute (s/round)", "{:.2f}"),
           ("comm_s", "comm (s/round)", "{:.2f}"), ("up_mib", "up (MiB/round)", "{:.2f}"),
           ("down_mib", "down (MiB/round)", "{:.2f}"),
           ("down_bcast_once_mib", "down, bcast once", "{:.2f}"),
           ("wire_up_mib", "wire up", "{:.2f}"),
           ("wire_down_mib", "wire down", "{:.2f}"), ("status", "status", "{}")]


def markdown(rows: list[dict], target: float, header: str) -> str:
    heads = [h.format(target=target) for _, h, _ in COLUMNS]
    lines = [header, "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for row in rows:
        cells = ["-" if row.get(k) is None else f.format(row[k]) for k, _, f in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per round, means over the rounds. up/down: bytes the clients send/receive "
              "(protocol counters; wire: the client hosts' interface counters; bcast once: "
              "a broadcast counted once, not once per client). compute: the slowest client's "
              "compute (the sum over clients for SL, whose clients take turns) + the "
              "server's and fed server's; comm = round - compute."]
    return "\n".join(lines) + "\n"


def plot(per_scheme: dict[str, list[dict]], rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = [out / "accuracy.png", out / "bytes.png", out / "latency.png"]
    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rounds in per_scheme.items():
        acc = [100 * (r["test_acc"] or 0) for r in rounds]
        wall = [sum(x["wall_s"] for x in rounds[:i + 1]) for i in range(len(rounds))]
        by_round.plot([r["round"] for r in rounds], acc, marker="o", label=label)
        by_time.plot(wall, acc, marker="o", label=label)
    by_round.set(xlabel="round", ylabel="test accuracy (%)", title="accuracy vs round")
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_time.set(xlabel="wall time (s)", ylabel="test accuracy (%)", title="accuracy vs time")
    by_round.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    ok = [r for r in rows if r["status"] == "ok"]
    x = range(len(ok))
    labels = [r["scheme"] for r in ok]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(ok)), 4))
    for dx, key, what in ((-0.27, "up_mib", "up (clients send)"),
                          (0, "down_mib", "down (clients receive)"),
                          (0.27, "down_bcast_once_mib", "down, a broadcast counted once")):
        ax.bar([i + dx for i in x], [r[key] for r in ok], 0.27, label=what)
    ax.set(ylabel="MiB per round (protocol)", title="bytes per round")
    ax.set_ylim(top=1.3 * max(r["up_mib"] for r in ok) if ok else None)
    ax.set_xticks(list(x), labels, rotation=20)
    ax.legend(ncol=3, fontsize="small", loc="upper center")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(ok)), 4))
    ax.bar(list(x), [r["compute_s"] for r in ok], 0.6, label="compute (critical path)")
    ax.bar(list(x), [r["comm_s"] for r in ok], 0.6, bottom=[r["compute_s"] for r in ok],
           label="communication and waiting")
    ax.set(ylabel="seconds per round", title="per-round latency")
    ax.set_xticks(list(x), labels, rotation=20)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[2], dpi=110)
    plt.close(fig)
    return paths


def write_outputs(out: Path, results: list[tuple[Spec, str | None, str | None]], target: float,
                  header: str) -> list[dict]:
    """From (spec, run folder, error) per scheme: the table, the per-round CSV and the plots."""
    rows, per_scheme = [], {}
    for spec, run_dir, error in results:
        rounds = analyse_run(run_dir) if run_dir and error is None else []
        if rounds:
            per_scheme[spec.label] = rounds
            rows.append(summary_row(spec.label, rounds, target))
        else:
            rows.append({"scheme": spec.label, "status": f"failed: {error}".splitlines()[0]})
    (out / "compare.md").write_text(markdown(rows, target, header))
    keys = [k for k, _, _ in COLUMNS]
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    with open(out / "rounds.csv", "w", newline="") as f:
        w = None
        for label, rounds in per_scheme.items():
            for r in rounds:
                if w is None:
                    w = csv.DictWriter(f, fieldnames=["scheme", *r])
                    w.writeheader()
                w.writerow({"scheme": label, **r})
    if per_scheme:
        plot(per_scheme, rows, out)
    return rows
