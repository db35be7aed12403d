"""Results on disk as the run goes, and what the user sees while it runs.

A run folder (runs/<time>-<name>/) holds config.json (the resolved config), rounds.jsonl
(one line per round, flushed and fsynced when written, so nothing is lost if the run dies),
summary.json at the end, node configs, logs and checkpoints. The console shows a live status
line and one line per round, then a short summary table.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# soft_wrap: a line longer than the terminal (or than rich's 80 columns when output goes to a
# file or pipe) stays one line, so paths and round lines can be copied and grepped whole.
console = Console(highlight=False, soft_wrap=True)


class RunDir:
    def __init__(self, out_dir: str | os.PathLike, name: str) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = Path(out_dir) / f"{stamp}-{name}"
        path, i = base, 1
        while path.exists():
            path, i = Path(f"{base}-{i}"), i + 1
        self.path = path
        for sub in ("logs", "ckpt", "nodes"):
            (path / sub).mkdir(parents=True, exist_ok=True)

    @classmethod
    def existing(cls, path: str | os.PathLike) -> RunDir:
        """An existing run folder, to append to (sledge resume)."""
        run_dir = cls.__new__(cls)
        run_dir.path = Path(path)
        return run_dir

    def file(self, *parts: str) -> str:
        return str(self.path.joinpath(*parts))

    def write_json(self, name: str, obj: Any, *, private: bool = False) -> None:
        """Write atomically; `private`: readable by the owner only (files holding keys)."""
        self.write_text(name, json.dumps(obj, indent=2, default=str), private=private)

    def reserve(self, name: str, obj: Any, size: int = 16384) -> None:
        """Write `obj` padded to `size` bytes, so that a later `overwrite` of at most that size
        needs no new space: the run's summary can still say why it failed on a full disk."""
        text = json.dumps(obj)
        self.write_text(name, text + " " * max(0, size - len(text)))

    def overwrite(self, name: str, obj: Any) -> None:
        """Rewrite a reserved file in place (no new blocks), then cut it to length."""
        data = json.dumps(obj, indent=2, default=str).encode()
        with _naming(self.path / name), open(self.path / name, "r+b") as f:
            f.write(data)
            f.truncate(len(data))
            f.flush()
            os.fsync(f.fileno())

    def write_text(self, name: str, text: str, *, private: bool = False) -> None:
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp")
        with _naming(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             0o600 if private else 0o644)
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            except OSError:
                tmp.unlink(missing_ok=True)  # no half-written file left on a full disk
                raise
            os.replace(tmp, target)

    def write_node_config(self, rel: str, config: dict) -> None:
        """A node's config, its paths relative to the run folder (so a copied or moved folder
        still resumes): `run_dir` is the folder relative to the config file's own folder, and
        nodes.nodeconfig.read makes the paths absolute again when the node starts."""
        out = dict(config)
        if out.get("checkpoint"):
            out["checkpoint"] = os.path.relpath(out["checkpoint"], self.path)
        out["run_dir"] = os.path.relpath(self.path, (self.path / rel).parent)
        self.write_json(rel, out, private=True)  # it holds the node's secret key

    def append(self, name: str, record: dict) -> None:
        with _naming(self.path / name), open(self.path / name, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """OSErrors of writes name the file (a failed write() does not): 'No space left on
    device' alone does not say where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def read_rounds(run_path: str | os.PathLike) -> list[dict]:
    with open(Path(run_path) / "rounds.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def round_line(rec: dict, total: int) -> str:
    tx = sum(v["tx_bytes"] for v in rec["nodes"].values())
    acc = rec.get("test_acc")
    return (f"round {rec['round']}/{total}  loss {rec['train_loss']:.4f}  "
            f"acc {acc * 100:.2f}%  time {rec['wall_s']:.2f}s  "
            f"protocol tx {fmt_bytes(tx)}" if acc is not None else
            f"round {rec['round']}/{total}  loss {rec['train_loss']:.4f}  "
            f"time {rec['wall_s']:.2f}s  protocol tx {fmt_bytes(tx)}")


def summarize(rounds: list[dict], planned: int | None = None) -> dict:
    """rounds_lost: planned rounds that never completed; rounds_redone: rounds that completed
    after a redo (attempts > 1). Definitions: docs/scenarios.md."""
    last = rounds[-1]
    done = {r["round"] for r in rounds}
    return {
        "rounds": len(rounds),
        "rounds_lost": 0 if planned is None else sum(1 for r in range(1, planned + 1)
                                                      if r not in done),
        "rounds_redone": sum(1 for r in rounds if r.get("attempts", 1) > 1),
        "final_test_acc": last.get("test_acc"),
        "final_train_loss": last["train_loss"],
        "first_train_loss": rounds[0]["train_loss"],
        "mean_round_s": sum(r["wall_s"] for r in rounds) / len(rounds),
        "total_s": sum(r["wall_s"] for r in rounds),
        # Every node of any round: a migrated server's node changes mid-run.
        "protocol_bytes_per_node": {
            n: {"tx": sum(r["nodes"][n]["tx_bytes"] for r in rounds if n in r["nodes"]),
                "rx": sum(r["nodes"][n]["rx_bytes"] for r in rounds if n in r["nodes"])}
            for n in dict.fromkeys(n for r in rounds for n in r["nodes"])},
        "interface_bytes": {
            i: {"tx": sum(r["interfaces"][i]["tx_bytes"] for r in rounds),
                "rx": sum(r["interfaces"][i]["rx_bytes"] for r in rounds)}
            for i in last["interfaces"]},
    }


def print_summary(summary: dict, path: str) -> None:
    t = Table(title="sledge run summary", show_header=True)
    t.add_column("node")
    t.add_column("protocol tx", justify="right")
    t.add_column("protocol rx", justify="right")
    for n, b in summary["protocol_bytes_per_node"].items():
        t.add_row(n, fmt_bytes(b["tx"]), fmt_bytes(b["rx"]))
    console.print(t)
    acc = summary["final_test_acc"]
    console.print(
        f"rounds {summary['rounds']}  mean round time {summary['mean_round_s']:.2f}s  "
        f"train loss {summary['first_train_loss']:.4f} -> {summary['final_train_loss']:.4f}"
        + (f"  test accuracy {acc * 100:.2f}%" if acc is not None else ""))
    if summary.get("rounds_lost") is not None:
        console.print(f"rounds lost {summary['rounds_lost']}  redone "
                      f"{summary.get('rounds_redone', 0)}")
    console.print(f"results: {path}")


def read_events(run_path: str | os.PathLike) -> list[dict]:
    p = Path(run_path) / "events.jsonl"
    if not p.exists():
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


# Event records too frequent or too detailed to mark on a plot (they are in events.jsonl).
UNMARKED = ("link_state", "position", "reaction", "skipped")


def plot_rounds(run_path: str | os.PathLike) -> Path:
    """rounds.png: each round's latency as a bar over the time it ran (seconds since round 1
    started), and every event of events.jsonl as a vertical line where it happened."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = read_rounds(run_path)
    t0 = min(r["time"] - r["wall_s"] for r in rounds)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.bar([r["time"] - r["wall_s"] - t0 for r in rounds], [r["wall_s"] for r in rounds],
           width=[r["wall_s"] for r in rounds], align="edge", alpha=0.6,
           edgecolor="black", label="round latency")
    for r in rounds:
        ax.annotate(str(r["round"]), (r["time"] - r["wall_s"] / 2 - t0, r["wall_s"]),
                    ha="center", va="bottom", fontsize="small")
    marked = [e for e in read_events(run_path) if e.get("kind") not in UNMARKED]
    top = max(r["wall_s"] for r in rounds) * 1.25
    for i, e in enumerate(marked):
        x = e["time"] - t0
        label = e.get("type", e.get("kind", "?"))
        ax.axvline(x, color=f"C{1 + i % 9}", linestyle="--", linewidth=1)
        ax.text(x, top * (0.98 - 0.07 * (i % 4)), f" {label}", rotation=0, fontsize="x-small",
                va="top", color=f"C{1 + i % 9}")
    ax.set(xlabel="seconds since round 1 started", ylabel="round latency (s)", ylim=(0, top),
           title=f"{Path(run_path).name}: per-round latency and events")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    out = Path(run_path) / "rounds.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def record_line(rec: dict[str, Any]) -> str | None:
    """One console line for an event, reroute or skipped record (None for the others)."""
    kind, t = rec.get("kind"), rec.get("t", 0.0)
    if kind == "event":
        what = " ".join(f"{k}={v}" for k, v in rec.items() if k in (
            "link", "user", "cell", "node", "to", "params", "file", "cause"))
        return (f"t={t:.2f}s round {rec.get('round')} ({rec.get('phase')}): "
                f"events[{rec.get('event')}] {rec.get('type')} {what}")
    if kind == "reroute":
        traffic = rec.get("traffic_s")
        return (f"re-routed after {rec.get('by')} {rec.get('link')}: routes in "
                f"{rec.get('routes_s', 0) * 1000:.0f} ms, data on the new path after "
                + (f"{traffic * 1000:.0f} ms" if traffic is not None else "(none seen)"))
    if kind == "skipped":
        return f"not reached: {rec.get('what')} due at {rec.get('due_s'):g}s ({rec.get('reason')})"
    return None
