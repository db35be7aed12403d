"""Results on disk as the run goes, what the user sees while it runs, and report.md at the end.

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
    f = rec.get("fidelity") or {}
    verdict = f"  fidelity {f['verdict']}" if f else ""
    if f.get("reasons"):
        verdict += f" ({'; '.join(f['reasons'][:2])})"
    return (f"round {rec['round']}/{total}  loss {rec['train_loss']:.4f}  "
            + (f"acc {acc * 100:.2f}%  " if acc is not None else "")
            + f"time {rec['wall_s']:.2f}s  protocol tx {fmt_bytes(tx)}{verdict}")


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
        # rounds by fidelity verdict (testbed.run.fidelity); trust a result as its worst round
        "fidelity": {v: sum(1 for r in rounds if (r.get("fidelity") or {}).get("verdict") == v)
                     for v in ("ok", "degraded", "invalid")},
        "interface_bytes": {
            i: {"tx": sum(r["interfaces"][i]["tx_bytes"] for r in rounds),
                "rx": sum(r["interfaces"][i]["rx_bytes"] for r in rounds)}
            for i in last["interfaces"]},
    }


class RunProgress:
    """The live line while the rounds run: a bar over the run's rounds (round r of N), time
    elapsed and an estimate of the time left from the rounds so far, and what the round is
    doing. On a terminal only; the round lines are printed above it either way."""

    def __init__(self, total: int, done: int = 0) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                            MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("left"),
                            TimeRemainingColumn(), console=console, transient=True,
                            disable=not console.is_terminal)
        self.task = self.bar.add_task("rounds", total=total, completed=done)

    def __enter__(self) -> RunProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def doing(self, what: str) -> None:
        self.bar.update(self.task, description=what)

    def advance(self) -> None:
        self.bar.advance(self.task)


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
    if verdicts := {k: v for k, v in (summary.get("fidelity") or {}).items() if v}:
        console.print("fidelity: " + ", ".join(f"{v} {k}" for k, v in verdicts.items())
                      + " (docs/link-emulation.md)")
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
    started), every event of events.jsonl as a vertical line where it happened; below, the
    training loss and the test accuracy per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = read_rounds(run_path)
    t0 = min(r["time"] - r["wall_s"] for r in rounds)
    fig, (ax, ax_loss, ax_acc) = plt.subplots(
        3, 1, figsize=(9, 9), gridspec_kw={"height_ratios": [2, 1, 1]})
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
    nums = [r["round"] for r in rounds]
    ax_loss.plot(nums, [r["train_loss"] for r in rounds], marker="o")
    ax_loss.set(xlabel="round", ylabel="train loss")
    accs = [(r["round"], r["test_acc"]) for r in rounds if r.get("test_acc") is not None]
    if accs:
        ax_acc.plot(*zip(*accs, strict=True), marker="o", color="C2")
    ax_acc.set(xlabel="round", ylabel="test accuracy", ylim=(0, 1),
               title="" if accs else "not evaluated (run.evaluate: false)")
    for a in (ax_loss, ax_acc):
        a.grid(alpha=0.3)
        a.set_xticks(nums if len(nums) <= 30 else nums[:: max(1, len(nums) // 30)])
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


def round_metrics(rec: dict, clients: list[str], sequential: bool) -> dict[str, Any]:
    """A round's latency split into compute on the critical path (the slowest client's, the
    sum over clients when they take turns, plus every other node's) and communication (the
    rest), and the bytes the clients sent and received (protocol and kernel counters)."""
    nodes = rec["nodes"]
    per_client = [nodes[c]["compute_s"] for c in clients]
    compute = (sum(per_client) if sequential else max(per_client)) + sum(
        v["compute_s"] for n, v in nodes.items() if n not in clients)
    wire = {i: v for i, v in rec["interfaces"].items() if i.rsplit("-eth", 1)[0] in clients}
    down = sum(nodes[c]["rx_bytes"] for c in clients)
    bcast = sum(nodes[c].get("by_type", {}).get("GRAD_BCAST.rx", 0) for c in clients)
    return {
        "round": rec["round"], "wall_s": rec["wall_s"], "test_acc": rec.get("test_acc"),
        "train_loss": rec["train_loss"], "compute_s": compute,
        "comm_s": max(0.0, rec["wall_s"] - compute),
        "client_compute_measured_s": max(nodes[c].get("compute_measured_s", 0.0)
                                         for c in clients),
        "client_compute_modelled_s": max(nodes[c].get("compute_modelled_s", 0.0)
                                         for c in clients),
        "up_bytes": sum(nodes[c]["tx_bytes"] for c in clients),
        "down_bytes": down, "down_bcast_once_bytes": down - bcast + bcast / len(clients),
        "wire_up_bytes": sum(v["tx_bytes"] for v in wire.values()),
        "wire_down_bytes": sum(v["rx_bytes"] for v in wire.values()),
    }

# -- report.md: the run in words, read back from its folder ------------------------------
def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_report(run_path: str | os.PathLike) -> Path:
    run = Path(run_path)
    config, summary = _json(run / "config.json"), _json(run / "summary.json")
    cfg = config.get("config", {})
    rounds = read_rounds(run) if (run / "rounds.jsonl").exists() else []
    scheme = cfg.get("scheme", {})
    opts = ", ".join(f"{k}={v}" for k, v in (scheme.get("options") or {}).items())
    v = config.get("versions") or {}
    targs = config.get("topology_args") or {}
    lines = [
        f"# {run.name}", "",
        f"- status: **{summary.get('status', 'unknown')}**"
        + (f" ({summary['reason']})" if summary.get("reason") else ""),
        f"- scheme: {scheme.get('name')}{f' ({opts})' if opts else ''}",
        f"- topology: {config.get('topology')} {targs.get('name') or ''} "
        f"{targs.get('params') or ''} on {config.get('network')}",
        f"- data: {cfg.get('data', {}).get('dataset')}, model {cfg.get('model', {}).get('name')} "
        f"cut after {', '.join(cfg.get('model', {}).get('cuts', []))}, "
        f"{config.get('iters_per_round')} iterations per round, "
        f"seed {cfg.get('run', {}).get('seed')}",
        f"- made with: sledge {v.get('sledge')}, torch {v.get('torch')}, Python {v.get('python')}, "
        f"kernel {v.get('kernel')}, commit {v.get('git')}",
        f"- run again: `sledge run {run / 'experiment.yaml'}`", "",
    ]
    if summary.get("rounds"):
        acc = summary.get("final_test_acc")
        lines += ["## Result", "",
                  f"{summary['rounds']} rounds; train loss {summary['first_train_loss']:.4f} -> "
                  f"{summary['final_train_loss']:.4f}"
                  + (f"; test accuracy {acc * 100:.2f} %" if acc is not None else "")
                  + f"; rounds {summary['total_s']:.2f} s of {summary.get('wall_s', 0):.1f} s "
                    f"wall time ({summary.get('startup_s', 0):.1f} s start-up)", ""]
    if rounds:
        clients = (config.get("roles") or {}).get("client", [])
        lines += ["## Rounds", "", "| round | train loss | test acc | latency (s) | clients sent "
                  "| events |", "| ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in rounds:
            sent = sum(r["nodes"].get(c, {}).get("tx_bytes", 0) for c in clients)
            events = ", ".join(sorted({e.get("type", e.get("kind", "")) for e in
                                       r.get("events", [])}))
            acc = r.get("test_acc")
            lines.append(f"| {r['round']} | {r['train_loss']:.4f} | "
                         f"{'' if acc is None else f'{acc * 100:.2f} %'} | {r['wall_s']:.3f} | "
                         f"{fmt_bytes(sent)} | {events} |")
        lines.append("")
    per_node = summary.get("protocol_bytes_per_node") or {}
    if per_node:
        lines += ["## Bytes per node (protocol)", "", "| node | sent | received |",
                  "| --- | ---: | ---: |"]
        lines += [f"| {n} | {fmt_bytes(b['tx'])} | {fmt_bytes(b['rx'])} |"
                  for n, b in per_node.items()]
        lines.append("")
    if config.get("not_applied"):
        lines += ["## Not emulated", "", *[f"- link {i.get('link')}: "
                  + ", ".join(f"{k}={x}" for k, x in i.items() if k != "link")
                  for i in config["not_applied"]], ""]
    if (run / "rounds.png").exists():
        lines += ["![latency, loss and accuracy per round](rounds.png)", ""]
    out = run / "report.md"
    out.write_text("\n".join(lines))
    write_html(run)
    return out


# -- report.html: the same, self-contained, with its panels ---------------------------------
def report_panels(run_path: str | os.PathLike) -> dict[str, Any]:
    """The data of report.html's panels, from the run folder: per round the loss, accuracy,
    latency split into compute and communication, and events; per link (interface) the bytes
    up and down from the kernel counters, and per node the protocol bytes."""
    run = Path(run_path)
    config = _json(run / "config.json")
    rounds = read_rounds(run) if (run / "rounds.jsonl").exists() else []
    clients = (config.get("roles") or {}).get("client", [])
    spec = (config.get("config") or {}).get("scheme") or {}
    sequential = False
    with contextlib.suppress(Exception):  # a scheme no longer installed: as if in parallel
        from nodes.schemes import get_scheme

        sequential = get_scheme(spec["name"], **spec.get("options", {})).sequential_clients
    per_round = []
    for r in rounds:
        m = round_metrics(r, [c for c in clients if c in r["nodes"]], sequential) \
            if clients else {}
        per_round.append({"round": r["round"], "train_loss": r["train_loss"],
                          "test_acc": r.get("test_acc"), "wall_s": r["wall_s"],
                          "compute_s": m.get("compute_s"), "comm_s": m.get("comm_s"),
                          "events": sorted({e.get("type", e.get("kind", "")) for e in
                                            r.get("events", [])})})
    def totals(key: str) -> dict[str, dict[str, int]]:
        """Bytes sent and received over the rounds, per interface or per node."""
        out: dict[str, dict[str, int]] = {}
        for r in rounds:
            for name, c in r[key].items():
                s = out.setdefault(name, {"tx_bytes": 0, "rx_bytes": 0})
                for d in s:
                    s[d] += c.get(d, 0)
        return out

    return {"rounds": per_round, "links": totals("interfaces"), "nodes": totals("nodes")}


def _png(fig: Any) -> str:
    import base64
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def write_html(run_path: str | os.PathLike) -> Path:
    """report.html: report.md's words and four panels (loss and accuracy, latency split into
    compute and communication with the events marked, bytes per link, bytes per node), the
    images inline and the panels' data in the page: it opens without any network."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_path)
    data = report_panels(run)
    rounds = data["rounds"]
    images = []
    if rounds:
        nums = [r["round"] for r in rounds]
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(nums, [r["train_loss"] for r in rounds], marker="o", label="train loss")
        ax.set(xlabel="round", ylabel="train loss")
        accs = [(r["round"], r["test_acc"]) for r in rounds if r["test_acc"] is not None]
        if accs:
            ax2 = ax.twinx()
            ax2.plot(*zip(*accs, strict=True), marker="s", color="C2", label="test accuracy")
            ax2.set(ylabel="test accuracy", ylim=(0, 1))
        ax.set_title("loss and accuracy per round")
        fig.tight_layout()
        images.append(("loss-accuracy", "Loss and accuracy per round", _png(fig)))
        fig, ax = plt.subplots(figsize=(7, 3))
        comp = [r["compute_s"] or 0.0 for r in rounds]
        comm = [r["comm_s"] if r["comm_s"] is not None else r["wall_s"] for r in rounds]
        ax.bar(nums, comp, label="compute")
        ax.bar(nums, comm, bottom=comp, label="communication")
        for r in rounds:
            if r["events"]:
                ax.axvline(r["round"], color="C3", linestyle="--", linewidth=1)
                ax.text(r["round"], max(r["wall_s"] for r in rounds), " " + ", ".join(
                    r["events"]), fontsize="x-small", color="C3", va="top")
        ax.set(xlabel="round", ylabel="seconds", title="round latency (events dashed)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        images.append(("latency", "Round latency: compute and communication", _png(fig)))
    for key, title in (("links", "Bytes per link (kernel counters)"),
                       ("nodes", "Bytes per node (protocol counters)")):
        items = sorted(data[key].items())
        if not items:
            continue
        fig, ax = plt.subplots(figsize=(7, max(2.0, 0.3 * len(items) + 1)))
        y = list(range(len(items)))
        ax.barh([i - 0.2 for i in y], [v["tx_bytes"] / 2**20 for _, v in items], height=0.4,
                label="sent")
        ax.barh([i + 0.2 for i in y], [v["rx_bytes"] / 2**20 for _, v in items], height=0.4,
                label="received")
        ax.set_yticks(y, [k for k, _ in items], fontsize="small")
        ax.set(xlabel="MiB", title=title)
        ax.legend(fontsize="small")
        fig.tight_layout()
        images.append((key, title, _png(fig)))
    words = (run / "report.md").read_text() if (run / "report.md").exists() else ""
    panel_json = json.dumps(data).replace("</", "<\\/")  # cannot end the script element
    body = "".join(f'<figure id="{k}"><img alt="{html.escape(t)}" src="data:image/png;base64,'
                   f'{b}"><figcaption>{html.escape(t)}</figcaption></figure>\n'
                   for k, t, b in images)
    page = (f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(run.name)}"
            f"</title><style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}"
            f"img{{max-width:100%}}pre{{white-space:pre-wrap}}</style></head><body>\n"
            f"<pre>{html.escape(words)}</pre>\n{body}"
            f'<script type="application/json" id="panel-data">{panel_json}</script>\n'
            # a self-check a headless browser can read back: how many panels decoded
            "<script>addEventListener('load', () => { document.body.dataset.panels = "
            "[...document.images].filter(i => i.naturalWidth > 0).length; });</script>\n"
            f"</body></html>\n")
    out = run / "report.html"
    out.write_text(page)
    return out
