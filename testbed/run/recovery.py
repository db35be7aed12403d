"""Controller side of fault tolerance: who is dead, and how a round is redone without loss.

Division of labour (docs/fault-tolerance.md; the node side is nodes.fault):
- `Liveness` keeps the time of every node's last heartbeat (its own thread and socket on the
  ipc control path, so data-plane transfers never delay it); a node is dead when it has been
  silent for `heartbeat_s * heartbeat_misses`, or at once when its process exits.
- `Recovery.recover` turns a death during round r into a redo of round r (a round-level
  transaction: every node checkpoints at the end of every round, so round r - 1's state is on
  disk everywhere): ABORT the survivors (their data-plane waits give up within 100 ms),
  `rollback` them to round r - 1 in a new epoch (messages of the aborted attempt are then
  dropped by every receiver), restart the dead nodes on their hosts from their round r - 1
  checkpoints through the run's launcher, `rejoin` (HELLOs both ways, so ROUTERs know the new
  connections), and the experiment broadcasts round r again.
- `resume_state` reads an interrupted run folder for `sledge resume`.
- A scenario's `kill` and `restart` events (testbed.scenario.faults) only signal a node's
  process; the death is seen here and the node comes back through `recover`.
Every death, restart and rollback goes to events.jsonl (and the next round's record).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from testbed.errors import RunFailed

if TYPE_CHECKING:
    from testbed.run.experiment import Experiment


class Liveness:
    """Last heartbeat per node; `overdue` names the nodes silent for longer than allowed."""

    def __init__(self, interval_s: float, misses: int) -> None:
        self.timeout_s = interval_s * misses
        self.last: dict[str, float] = {}
        self.beats: dict[str, int] = {}

    def beat(self, name: str) -> None:
        self.last[name] = time.monotonic()  # watched from its first beat
        self.beats[name] = self.beats.get(name, 0) + 1

    def overdue(self) -> dict[str, float]:
        now = time.monotonic()
        return {n: now - t for n, t in self.last.items() if now - t > self.timeout_s}


class Recovery:
    """The run's fault-tolerance state: epoch, restarts used, what was redone."""

    def __init__(self, exp: Experiment) -> None:
        cfg = exp.cfg
        self.status: dict[str, dict[str, Any]] = {}  # node -> its last beat's state, iteration
        self.exp = exp
        self.enabled = cfg.fault.max_restarts > 0 and bool(cfg.fault.heartbeat_s)
        self.liveness = Liveness(cfg.fault.heartbeat_s, cfg.fault.heartbeat_misses)
        self.epoch = 0
        self.failures = self.restarts = self.rollbacks = 0
        self.redone: list[int] = []  # one entry per redo of a round
        self.aborted: dict[str, tuple[float, str]] = {}  # node -> (when, why) this attempt
        self.down: set[str] = set()  # dead and not yet restarted: not reported again

    # -- detection ----------------------------------------------------------------------------
    def on_message(self, sender: str, msg: Any) -> bool:
        """Handle the control messages that belong to liveness; True if it was one."""
        if msg.type == "HEARTBEAT":
            node = sender.removesuffix("#hb")
            self.liveness.beat(node)
            if "state" in msg.meta:  # what it is doing: the progress line shows it
                self.status[node] = {"state": str(msg.meta["state"]),
                                     "iteration": int(msg.meta.get("iteration", 0))}
            return True
        if msg.type == "ABORTED":
            self.aborted.setdefault(sender, (time.monotonic(), msg.meta.get("error", "")))
            return True
        return False

    def dead(self) -> dict[str, str]:
        """Node -> why it is considered dead (its process exited, or it fell silent)."""
        procs = self.exp.procs  # a node migrated away has left it, and is not watched
        out = {n: f"exited with code {p.returncode()}" for n, p in procs.items()
               if n not in self.down and p.returncode() is not None}
        for n, silence in self.liveness.overdue().items():
            if n in procs and n not in self.down:
                out.setdefault(n, f"no heartbeat for {silence:.1f}s "
                                  f"(limit {self.liveness.timeout_s:.1f}s)")
        return out

    def stuck(self) -> str | None:
        """A node aborted its round although nobody died (e.g. a peer unreachable): after the
        time a death would have taken to show, that is a failure, not a fault to recover."""
        if not self.aborted:
            return None
        first = min(t for t, _ in self.aborted.values())
        if time.monotonic() - first < self.liveness.timeout_s + 2.0:
            return None
        return "; ".join(f"{n}: {why}" for n, (_, why) in sorted(self.aborted.items()))

    # -- reaction -----------------------------------------------------------------------------
    def recover(self, rnd: int, dead: dict[str, str]) -> dict[str, dict]:
        """Redo round `rnd` after `dead` died in it: returns the restarted nodes' HELLO metas
        (their data-plane counters start again from zero)."""
        exp = self.exp
        t0 = time.perf_counter()
        self.failures += len(dead)
        for n, why in sorted(dead.items()):
            exp.log_event({"kind": "node_dead", "node": n, "round": rnd, "why": why,
                       "time": time.time()})
        if self.restarts + len(dead) > exp.cfg.fault.max_restarts:
            raise RunFailed(f"round {rnd}: node(s) {sorted(dead)} died ({dead}); the run "
                            f"already used {self.restarts} of max_restarts="
                            f"{exp.cfg.fault.max_restarts} restarts")
        survivors = [n for n in exp.procs if n not in dead]
        self.down |= set(dead)
        self.epoch += 1
        # From here the controller stamps this epoch and drops anything older (reports of
        # the aborted attempt); nodes started later (restarts, migrations) start in it.
        exp.control.epoch = self.epoch
        for nc in exp.node_configs.values():
            nc["epoch"] = self.epoch
        for n in survivors:  # their heartbeat threads raise the abort flag at once
            exp.control.interrupt(n, rnd, cmd="abort", epoch=self.epoch)
        for n in dead:  # one silent but alive must not come back as a twin
            exp.procs[n].stop(grace_s=1.0)
            self.liveness.last.pop(n, None)
        to_round = rnd - 1
        for n in survivors:
            exp.control.send(n, rnd, cmd="rollback", epoch=self.epoch, to_round=to_round)
        exp.control.collect("REPORT", rnd, exp.cfg.timeouts.start_s, f"round {rnd}: rollback",
                            nodes=survivors)
        self.rollbacks += 1
        exp.log_event({"kind": "rollback", "round": rnd, "to_round": to_round, "epoch": self.epoch,
                   "nodes": survivors, "time": time.time()})
        for n in sorted(dead):
            self.restart(n, to_round)
        for n, m in rejoin_plan(exp.node_configs, list(dead)).items():
            exp.control.send(n, rnd, cmd="rejoin", **m, timeout_s=exp.cfg.timeouts.start_s)
        hello = exp.control.collect("HELLO", 0, exp.cfg.timeouts.start_s,
                                    f"round {rnd}: restart", nodes=list(dead))
        self.aborted.clear()
        self.redone.append(rnd)
        exp.log_event({"kind": "redo", "round": rnd, "restarted": sorted(dead),
                   "recovery_s": time.perf_counter() - t0, "time": time.time()})
        return hello

    def restart(self, name: str, to_round: int) -> None:
        """Start `name` again on its host, from its checkpoint of `to_round`, in this epoch."""
        exp = self.exp
        cfg = {**exp.node_configs[name], "restore_round": to_round}
        rel = os.path.join("restarts", f"{name}.json")
        exp.run_dir.write_node_config(rel, cfg)
        exp.procs[name] = exp.launcher.start(exp.network.host(name), exp.run_dir.file(rel),
                                             exp.run_dir.file("logs", f"{name}.log"))
        exp.run_dir.write_json("pids.json", {n: p.pid for n, p in exp.procs.items()})
        self.down.discard(name)
        self.restarts += 1
        exp.log_event({"kind": "restart", "node": name, "pid": exp.procs[name].pid,
                   "from_round": to_round, "epoch": self.epoch, "time": time.time()})

    def summary(self, completed: list[int], planned: int) -> dict[str, Any]:
        """Counts for summary.json. A round is lost when it never completed; a redone round
        completed (recovered), so it is not lost."""
        done = set(completed)
        return {"failures": self.failures, "restarts": self.restarts,
                "rollbacks": self.rollbacks, "rounds_redone": len(self.redone),
                "redone": self.redone,
                "rounds_lost": sum(1 for r in range(1, planned + 1) if r not in done)}


def rejoin_plan(configs: dict[str, dict], restarted: list[str]) -> dict[str, dict[str, list]]:
    """For every survivor that talks to a restarted node: which of its DEALERs (peers, or
    proxies speaking as a client) must say HELLO to it, and whose HELLOs its ROUTER must
    wait for (the identities the restarted node dials it with)."""
    back = {configs[r].get("listen") for r in restarted} - {None}
    out: dict[str, dict[str, list]] = {}
    for n, c in configs.items():
        if n in restarted:
            continue
        dials = {**c.get("peers", {}), **c.get("proxies", {})}  # endpoint key -> address
        hello = [k for k, a in dials.items() if a in back]
        accept = []  # a DEALER's identity: its node's name, or the client a proxy speaks as
        for r in restarted:
            accept += [r for a in configs[r].get("peers", {}).values() if a == c.get("listen")]
            accept += [k for k, a in configs[r].get("proxies", {}).items()
                       if a == c.get("listen")]
        if hello or accept:
            out[n] = {"hello": hello, "accept": accept}
    return out


def checkpoint_rounds(path: str) -> tuple[list[int], list[str]]:
    """The rounds a node's checkpoint files (current and .prev) hold, and for each file that
    is truncated or not a checkpoint at all, a line naming it."""
    out, bad = [], []
    for p in (path, f"{path}.prev"):
        if os.path.exists(p):
            try:
                out.append(int(torch.load(p, weights_only=True)["round"]))
            except Exception as e:  # torch raises many kinds for a torn or foreign file
                why = " ".join(str(e).split())[:200]
                bad.append(f"checkpoint {p}: unreadable, truncated or not a checkpoint "
                           f"({type(e).__name__}{': ' + why if why else ''})")
    return out, bad


def read_recorded_rounds(path: Path) -> tuple[list[dict], str | None]:
    """rounds.jsonl's records, and a note if its last line was torn (the run died while
    writing it) and is dropped here: that round is redone. A bad line before the last is
    corruption, not a torn write: ValueError naming the file and line."""
    file = path / "rounds.jsonl"
    if not file.exists():
        return [], None
    raw = file.read_bytes()
    lines = raw.split(b"\n")
    records, offset = [], 0
    for i, line in enumerate(lines, start=1):
        is_last = i == len(lines) or (i == len(lines) - 1 and lines[-1] == b"")
        if line.strip():
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "round" not in rec:
                    raise ValueError("not a round record")
            except ValueError as e:
                if not is_last:
                    raise ValueError(f"{file}, line {i}: corrupt round record ({e}); only a "
                                     f"torn last line can be dropped") from None
                # Cut the torn tail off, so this run appends its redo after the last good line.
                with open(file, "r+b") as f:
                    f.truncate(offset)
                return records, (f"{file}, line {i}: torn record dropped (the run stopped "
                                 f"while writing it); round {len(records) + 1} is redone")
            records.append(rec)
        offset += len(line) + 1
    return records, None


def resume_state(run_path: str | os.PathLike) -> dict[str, Any]:
    """What `sledge resume` needs from an interrupted run folder: its config and topology,
    the rounds recorded, and the round to restart from (the last one recorded, which every
    node checkpointed: a node is at most one round ahead, and keeps the previous file).
    Checkpoint paths are read relative to the folder, so a copied or moved folder resumes."""
    path = Path(run_path)
    try:
        resolved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a run folder (config.json: {e})") from None
    summary = path / "summary.json"
    if summary.exists():
        try:
            status = json.loads(summary.read_text()).get("status", "ok")
        except (OSError, ValueError, AttributeError):
            status = "unreadable"
        if status == "ok":
            raise ValueError(f"{path}: the run completed (summary.json exists); nothing to "
                             f"resume")
    rounds, torn = read_recorded_rounds(path)
    last = rounds[-1]["round"] if rounds else 0
    missing = {}
    for f in sorted((path / "nodes").glob("*.json")):
        try:
            nc = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"node config {f}: {e}") from None
        if not nc.get("checkpoint"):
            continue
        # Relative to the folder (RunDir.write_node_config); an absolute one (older runs)
        # counts where it is, or else by its name in this folder's ckpt/ (the folder moved).
        ckpt = path / nc["checkpoint"]
        if os.path.isabs(nc["checkpoint"]) and not os.path.exists(ckpt):
            ckpt = path / "ckpt" / os.path.basename(nc["checkpoint"])
        if nc.get("ship_checkpoint"):  # on another machine: the copy its REPORTs brought
            ckpt = path / "ckpt" / f"{nc['name']}.pt"
        have, bad = checkpoint_rounds(str(ckpt))
        if last not in have:
            if bad:  # the round needed is in a file that cannot be read: that file is named
                raise ValueError(bad[0])
            missing[nc["name"]] = have
    if missing:
        raise ValueError(f"{path}: no checkpoint of round {last} (the last recorded) for "
                         f"{missing} (node -> rounds found)")
    return {"path": str(path), "resolved": resolved, "rounds": rounds, "from_round": last,
            "notes": [torn] if torn else []}
