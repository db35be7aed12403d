"""One experiment run: topology + scheme + config -> a run folder of measured results.

The controller side of sledge. It builds the network, writes one config per node (placement
from the scheme, data shards from the partition, peer addresses from Mininet), starts a node
process in every host, drives the rounds over an ipc:// control socket that lives outside the
emulated network (and, for nodes on other machines, a TCP endpoint their control forwarders
reach: docs/cluster.md), reads protocol and kernel counters, evaluates from checkpoints, and
writes every round to disk as it ends. Whatever happens (a node crash, a timeout, Ctrl-C, SIGTERM),
teardown stops the node processes it started and the Mininet net it built, nothing else.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import yaml
import zmq

from nodes.compression import make_codec
from nodes.data import load_dataset
from nodes.imports import is_reference
from nodes.protocol import Plane, Security
from nodes.schemes import get_scheme
from testbed.emu.capabilities import probe
from testbed.emu.loopback import LoopbackNetwork, counter_delta
from testbed.emu.owned import owned_tmpdir
from testbed.emu.topolib import Topo
from testbed.emu.topology import load_topology, script_of
from testbed.errors import BadInput, ConfigError, NodesDead, RunFailed
from testbed.plan.config import RunConfig
from testbed.plan.runplan import PlanError, RunPlan, host_roles, per_host, plan_run
from testbed.run.cluster import ClusterLauncher, Forwarders
from testbed.run.control import ControlChannel
from testbed.run.evaluate import Evaluator
from testbed.run.fidelity import Fidelity
from testbed.run.hooks import RunHook
from testbed.run.launcher import Launcher, NodeProcess, make_launcher, stop_all
from testbed.run.pool import ClientPool
from testbed.run.preflight import free_port_block, make_run_dir, preflight
from testbed.run.records import (
    RunDir,
    RunProgress,
    console,
    print_summary,
    record_line,
    round_line,
    summarize,
    write_report,
)
from testbed.run.recovery import Recovery
from testbed.run.versions import versions

if TYPE_CHECKING:  # testbed.emu.network imports Mininet: only a Mininet run loads it
    from testbed.emu.network import Network



def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _delta(now: dict, before: dict) -> dict:
    out = {}
    for k, v in now.items():
        if isinstance(v, dict):
            out[k] = _delta(v, before.get(k, {}))
        elif isinstance(v, (int, float)):
            out[k] = v - before.get(k, 0)
    return out


EXPERIMENT_HEAD = ("# sledge experiment: `sledge run <this file>` runs it again "
                   "(docs/experiments.md)\n")


class Experiment:
    runs_scenarios = False  # testbed.scenario.Experiment runs them (a hook)

    def __init__(self, cfg: RunConfig, topo: Topo | str, *, topology: str = "",
                 on_round: Callable[[Experiment, int], None] | None = None,
                 on_start: Callable[[Experiment], None] | None = None,
                 on_ready: Callable[[Experiment], None] | None = None,
                 loopback: bool = False, topology_args: dict[str, Any] | None = None,
                 resume: dict[str, Any] | None = None, quiet: bool = False) -> None:
        """topo: a Topo, or a topology script's path or name ("tiny": topologies/tiny.py,
        built with its defaults). quiet: nothing on the console (the run folder has it all).
        on_start(exp): called once the network is up, before any node starts (e.g. to
        start a packet capture); on_ready(exp): every node is up and idle, before round 1;
        on_round(exp, round): after each round is recorded. topology_args: {"name",
        "params"} the topology was built with (recorded for `sledge resume`); resume: from
        testbed.run.recovery.resume_state, continue that run folder. A scenario timeline
        (cfg.run.scenario) needs testbed.Experiment (testbed.scenario), which runs it as a hook."""
        if isinstance(topo, str):
            topology = topology or script_of(topo)
            try:
                topo, built = load_topology(topo)
            except ConfigError as e:
                raise BadInput(str(e)) from None
            topology_args = topology_args or {"name": built, "params": {}}
        self.quiet = quiet
        # As given, before the run changes anything (a free port on loopback): experiment.yaml
        self.given = cfg.to_dict()
        self.cfg, self.topo, self.topology, self.on_round = cfg, topo, topology, on_round
        self.on_start, self.on_ready = on_start, on_ready
        try:  # a bad scheme name or option fails here, before any network is built
            self.scheme = get_scheme(cfg.scheme.name, **cfg.scheme.options)
        except ValueError as e:
            raise BadInput(f"config field 'scheme.name': {e}") from None
        try:  # what this scheme cannot run (e.g. EPSL with per-client compression)
            self.scheme.check_run(cfg.to_dict())
        except ValueError as e:
            raise BadInput(str(e)) from None
        self.loopback = loopback
        self.caps = probe()
        self.network: Network | LoopbackNetwork | None = None
        self.procs: dict[str, NodeProcess] = {}
        self.node_configs: dict[str, dict] = {}
        self.rounds: list[dict] = []
        self.run_dir: RunDir | None = None
        self._zctx: zmq.Context | None = None
        self.control = ControlChannel(self)
        self._plane: Plane | None = None
        # name -> its CURVE keys for this run (testbed hosts and "controller"); empty: insecure
        self.security: dict[str, Security] = {}
        self._ctl_dir: str | None = None
        self.launcher: Launcher | None = None
        self.forwarders = Forwarders()  # control forwarders on other servers (cluster.servers)
        self.controller: Any = None  # testbed.emu.routing.Controller on Mininet networks
        self.placement_plan: dict | None = None  # the controller's, when it placed a chain
        # Device heterogeneity, host -> value (testbed.emu.network.LimitedHost; nodes.context).
        self.limits: dict[str, dict[str, Any]] = {}
        # Events and reactions since the last round (events.jsonl), noted in the next round's
        # record; added under event_lock (a scenario's timer thread adds them too).
        self.events: list[dict] = []
        self.event_lock = threading.RLock()
        # What layers above add to the run (testbed.run.hooks): a scenario's engine.
        self.hooks: list[RunHook] = []
        self.scenario: Any = None
        if cfg.run.scenario and not self.runs_scenarios:
            raise BadInput("config field 'run.scenario': this Experiment runs no scenarios; use "
                           "testbed.Experiment (testbed.scenario.Experiment)")
        self.topology_args = topology_args or {}
        self.resume = resume
        # who takes part in each round
        self.pool = ClientPool(cfg.efficiency.selection, cfg.run.seed)
        self.fidelity = Fidelity(self)  # was the emulation faithful, round by round
        self.progress: RunProgress | None = None  # the live line while rounds run
        self.recovery = Recovery(self)  # heartbeats, restarts, rollbacks (testbed.run.recovery)
        try:
            self.host_roles = host_roles(topo, cfg.net.roles)
            for key in ("cpu", "mem_mb"):
                for h, v in per_host(topo, key, getattr(cfg.devices, key),
                                     self.host_roles).items():
                    self.limits.setdefault(h, {})[key] = v
            self.cycles: dict[str, float] = per_host(topo, "cycles", cfg.devices.cycles,
                                                     self.host_roles)
        except PlanError as e:
            raise BadInput(str(e)) from None
        try:  # model, cuts, data set and its files, link parameters: before anything starts
            preflight(cfg, topo)
        except ConfigError as e:
            raise BadInput(str(e)) from e

    # -- as a context manager: whatever happens inside, what the run made is torn down -----
    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: object) -> None:
        self._teardown()

    # -- set-up ---------------------------------------------------------------------------------
    def _plan(self) -> RunPlan:
        try:
            plan = plan_run(self.cfg, self.scheme, self.topo, self.host_roles, self.limits,
                            self.cycles, run_id=self.run_id,
                            control=self.local_control, ip=self.network.ip,
                            checkpoint=self._node_checkpoint, topology=self.topology,
                            remote_control=self.remote_control)
        except PlanError as e:
            raise BadInput(str(e)) from None
        self.plan = plan
        self.roles, self.placement, self.placement_plan = (plan.roles, plan.placement,
                                                           plan.placement_plan)
        self.parts, self.model_kwargs, self.iters = plan.parts, plan.model_kwargs, plan.iters
        self.data_links, self.shard_info = plan.data_links, plan.shard_info
        return plan

    @property
    def local_control(self) -> str:
        """The ipc:// address of the controller's control socket, dialled by local nodes."""
        return f"ipc://{self._ctl_dir}/control"

    @property
    def remote_control(self) -> str:
        """The ipc:// address a node on another machine dials: its machine's control
        forwarder listens there (testbed.run.forward), never the controller itself."""
        return f"ipc://{self._ctl_dir}/remote"

    def checkpoint_path(self, host: str) -> str:
        """Where the controller reads `host`'s checkpoint: the node's own file, or for a
        remote node the copy of what its REPORT brought (testbed.run.control)."""
        return self.run_dir.file("ckpt", f"{host}.pt")

    def _node_checkpoint(self, host: str) -> str:
        # A remote node keeps its own file under another name: on one machine (a test) the
        # node's rotation and the controller's copy must not share a file.
        return (self.run_dir.file("ckpt", f"{host}.remote.pt")
                if host in self.cfg.cluster.remote else self.checkpoint_path(host))

    def _secure(self) -> None:
        """A keypair for every host of the topology and for the controller, each node's own
        in its config with everyone's public keys (a spare host a migration starts later has
        its keys already). Node config files are written readable by root only."""
        if self.cfg.security.insecure:
            return
        speaks = {n: sorted(c["proxies"]) for n, c in self.node_configs.items()
                  if c.get("proxies")}
        self.security = {n: replace(sec, speaks_as=speaks) for n, sec in
                         Security.for_run([*self.topo.hosts(), "controller"]).items()}
        for n, nc in self.node_configs.items():
            nc["security"] = self.security[n].to_dict()

    def rejections(self, bye: dict[str, Any] | None = None) -> dict[str, dict[str, int]]:
        """Everything refused from start to stop, by process and reason: each node's count as
        its BYE says (start-up and shutdown included), and the controller's control socket."""
        out = {n: dict(m.get("proto", {}).get("rejected", {})) for n, m in (bye or {}).items()}
        if mine := self.control.rejections():
            out["controller"] = mine
        return {n: r for n, r in out.items() if r}

    def _resolved_config(self) -> dict:
        net = self.network
        return {
            "run": self.run_id, "config": self.cfg.to_dict(), "topology": self.topology,
            "topology_args": self.topology_args, "loopback": self.loopback,
            "roles": self.roles,
            "capabilities": self.caps.to_dict(), "versions": versions(),
            "network": net.kind, "hosts": net.describe_hosts(),
            "links": net.link_params(), "not_applied": net.not_applied,
            "placement": self.placement, "placement_plan": self.placement_plan,
            "routes": self._routes(),
            "scenario": self.scenario.to_dict() if self.scenario is not None else None,
            "iters_per_round": self.iters, "model": self.model_kwargs,
            "limits": self.limits, "cycles": self.cycles,
            "shards": self.shard_info,
            "connections": {n: {"listen": c.get("listen"), "peers": c["peers"],
                                **({"proxies": c["proxies"]} if c.get("proxies") else {})}
                            for n, c in self.node_configs.items()},
        }

    def spec(self) -> dict[str, Any] | None:
        """The experiment file that runs this experiment again (None: the topology is not a
        script, e.g. a Topo made in Python)."""
        if not self.topology or not os.path.isfile(self.topology):
            return None
        return {"topology": {"script": os.path.abspath(self.topology),
                             "name": self.topology_args.get("name"),
                             "params": self.topology_args.get("params") or {}},
                "loopback": self.loopback, **self.given}

    # -- control --------------------------------------------------------------------------------
    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        for hook in self.hooks:
            hook.validate(self)
        if not self.loopback:
            try:  # the one place a run needs Mininet: checked before anything is made
                import testbed.emu.network  # noqa: F401
            except ImportError as e:
                raise BadInput(f"a Mininet network needs Debian's mininet package ({e}); "
                               f"without it, run with --loopback") from e
        if self.loopback:  # nodes share 127.0.0.1: their ports must be free there
            try:
                cfg.net.port = free_port_block(cfg.net.port, len(self.topo.hosts()))
            except ConfigError as e:
                raise BadInput(str(e)) from e
        self.run_dir = (RunDir.existing(self.resume["path"]) if self.resume
                        else self._new_run_dir())
        self.run_id = os.path.basename(self.run_dir.path)
        self._t_start = time.perf_counter()
        old_term = signal.signal(signal.SIGTERM, _raise_on_sigterm)
        was_quiet, console.quiet = console.quiet, console.quiet or self.quiet
        if not self.loopback:  # how links are emulated: nothing of it applies on loopback
            for line in self.caps.describe():
                console.print(("[yellow]" if line.startswith("WARNING") else "") + line)
        try:
            # Room for the summary from the start: a run failing on a full disk still says so.
            self.run_dir.reserve("summary.json", {"status": "running"})
            self._ctl_dir = owned_tmpdir("ctl")
            # First: a zygote imports torch and warms up (~2 s) while the network and the plan
            # are built; the first node it starts waits for it.
            self.launcher = make_launcher(cfg.run.launcher, preimport=tuple(
                r for r in (cfg.model.name, cfg.data.dataset, cfg.scheme.name)
                if is_reference(r)), start_timeout_s=cfg.timeouts.start_s)
            if self.loopback:
                console.print("[yellow]loopback network: no emulation, all nodes on 127.0.0.1 "
                              f"(ports from {cfg.net.port})")
                self.network = LoopbackNetwork(self.topo, self.caps)
                if self.limits:
                    console.print(f"[yellow]loopback network: cpu and mem_mb are NOT applied "
                                  f"({self.limits})")
            elif cfg.cluster.servers:  # Mininet's cluster edition (docs/cluster.md)
                from testbed.emu.cluster import build_cluster

                if self.limits:
                    raise BadInput(f"cluster.servers: cpu and mem_mb limits are per machine and "
                                   f"not applied on a cluster ({self.limits})")
                if cfg.run.launcher != "zygote":
                    raise BadInput("cluster.servers: this machine's nodes need run.launcher "
                                   "zygote (Mininet's RemoteHost.popen detaches mnexec here)")
                try:
                    self.network = build_cluster(
                        self.topo, self.caps, servers=cfg.cluster.servers,
                        placer=cfg.cluster.placer, place=cfg.cluster.place,
                        link_backend=cfg.net.link_backend)
                except ValueError as e:
                    raise BadInput(str(e)) from None
                # The hosts placed on other servers are remote nodes, whatever the config said.
                cfg.cluster.remote = sorted({*cfg.cluster.remote,
                                             *self.network.remote_hosts()})
                self.launcher = ClusterLauncher(self.launcher)
            else:
                from testbed.emu.network import build_network

                self.network = build_network(self.topo, self.caps,
                                             link_backend=cfg.net.link_backend, limits=self.limits)
            for item in self.network.not_applied if not self.loopback else ():
                console.print(f"[yellow]not applied on link {item['link']}: "
                              + ", ".join(f"{k}={v}" for k, v in item.items() if k != "link"))
            self.node_configs = self._plan().configs
            self._secure()
            if not self.loopback:
                self._install_routes()
                if cfg.net.linkcheck:
                    self._linkcheck()
            if not self.resume:  # a resumed run keeps its config.json
                self.run_dir.write_json("config.json", self._resolved_config())
                if (spec := self.spec()) is not None:
                    self.run_dir.write_text("experiment.yaml", EXPERIMENT_HEAD + yaml.safe_dump(
                        spec, sort_keys=False, default_flow_style=None, width=100))
            test = load_dataset(cfg.data.dataset, "test", root=cfg.data.root,
                                limit=cfg.data.test_limit,
                                seed=cfg.run.seed)
            evaluator = Evaluator(self.model_kwargs, cfg.model.cuts, test,
                                  codec=make_codec(cfg.efficiency.compression, cfg.run.seed)) \
                if cfg.run.evaluate else None
            self._zctx = zmq.Context()
            hosts = self.topo.hosts()
            self._plane = Plane(self._zctx, self.run_id, self.security.get("controller"),
                                max_connections=2 * len(hosts) + 8)
            self.control.open(self._plane, self.local_control, hosts,
                              tcp=cfg.cluster.control)
            if cfg.cluster.servers and not self.loopback:  # before any remote node dials
                self.forwarders.start(self.network.net.hosts,
                                      self.remote_control.removeprefix("ipc://"),
                                      self.control.tcp, cfg.timeouts.start_s)
            if self.on_start:
                self.on_start(self)
            first = self._resume_start() if self.resume else 1
            for name, nc in self.node_configs.items():
                rel = os.path.join("nodes", f"{name}.json")
                if self.resume:  # from the checkpoint of the last recorded round
                    rel = os.path.join("resume", f"{name}.json")
                    nc = {**nc, "restore_round": first - 1}
                path = self.run_dir.file(rel)
                self.run_dir.write_node_config(rel, nc)
                self.procs[name] = self.launcher.start(self.network.host(name), path,
                                                       self.run_dir.file("logs", f"{name}.log"))
            self.run_dir.write_json("pids.json", {n: p.pid for n, p in self.procs.items()})
            self.fidelity.start()
            with console.status("starting nodes"):
                hello = self.control.collect("HELLO", 0, cfg.timeouts.start_s, "start-up")
            startup_s = time.perf_counter() - self._t_start
            # Round 1's traffic is counted from here: the data-plane HELLOs are start-up.
            self.control.startup_proto = {n: m.get("proto", {}) for n, m in hello.items()}
            for rec in self.rounds:  # recorded before a resume: counters restart from here
                rec["_proto"] = self.control.startup_proto
            if self.on_ready:
                self.on_ready(self)
            with RunProgress(cfg.run.rounds, first - 1) as self.progress:
                for rnd in range(first, cfg.run.rounds + 1):
                    for hook in self.hooks:
                        hook.before_round(self, rnd)
                    self._round(rnd, evaluator)
                    self.progress.advance()
                    for hook in self.hooks:
                        hook.after_round(self, rnd)
            for hook in self.hooks:
                hook.finish(self)
            self.control.broadcast(0, cmd="stop")
            bye = self.control.collect("BYE", 0, 60, "shutdown")
            for p in self.procs.values():
                p.wait(30)
            summary = summarize(self.rounds, planned=cfg.run.rounds)
            summary["rejected"] = self.rejections(bye)
            # total_s sums the rounds; these are the run as a user waits for it.
            summary["wall_s"] = time.perf_counter() - self._t_start
            summary["startup_s"] = startup_s
            summary["recovery"] = self.recovery.summary([r["round"] for r in self.rounds],
                                                        cfg.run.rounds)
            summary["status"] = "ok"
            self.run_dir.write_json("summary.json", summary)
            self._plot()
            print_summary(summary, str(self.run_dir.path))
            return summary
        except KeyboardInterrupt:
            console.print("[red]interrupted: tearing down")
            self._finish_failed("interrupted", "interrupted (Ctrl-C or SIGTERM)")
            raise
        except BaseException as e:
            self._finish_failed("failed", f"{type(e).__name__}: {e}" if not isinstance(
                e, RunFailed) else str(e))
            raise
        finally:
            self._teardown()
            signal.signal(signal.SIGTERM, old_term)
            console.quiet = was_quiet

    def show_progress(self) -> None:
        """The live line: the round, how far the clients are (their optimizer steps of the
        round's iterations, from their heartbeats) and what the nodes are doing."""
        if self.progress is None or not getattr(self, "_doing", None):
            return
        rnd, attempts = self._doing
        status = self.recovery.status
        clients = self.roles.get("client", [])
        steps = [status[c]["iteration"] for c in clients if c in status]
        states: dict[str, int] = {}
        for n in self.procs:
            s = status.get(n, {}).get("state", "starting")
            states[s] = states.get(s, 0) + 1
        self.progress.doing(
            f"round {rnd}" + (f" (attempt {attempts})" if attempts > 1 else "")
            + f": iteration {min(steps) if steps else 0}/{self.iters} · "
            + ", ".join(f"{k} {v}" for k, v in sorted(states.items())))

    def _new_run_dir(self) -> RunDir:
        try:
            return make_run_dir(self.cfg.run.out_dir, self.cfg.run.name)
        except ConfigError as e:
            raise BadInput(str(e)) from e

    def _finish_failed(self, status: str, reason: str) -> None:
        """A run that did not finish leaves no unmarked folder: summary.json says why, with
        what it measured; a new run that never started a node (nothing measured, nothing to
        resume) leaves no folder at all."""
        if self.run_dir is None or self.run_dir.path is None:
            return
        if not self.resume and not self.procs and not self.rounds:
            shutil.rmtree(self.run_dir.path, ignore_errors=True)
            return
        summary: dict[str, Any] = {}
        if self.rounds:
            with suppress(Exception):
                summary = summarize(self.rounds, planned=self.cfg.run.rounds)
        summary.update(status=status, reason=reason, rejected=self.rejections())
        try:
            self.run_dir.write_json("summary.json", summary)
        except OSError:  # a full disk: into the space reserved at the start
            with suppress(OSError):  # and it must not hide the error that ended the run
                self.run_dir.overwrite("summary.json", summary)
        with suppress(Exception):  # what it did until then, in words
            write_report(self.run_dir.path)

    def _resume_start(self) -> int:
        """The first round to run when resuming; the recorded ones count as done."""
        self.rounds = [dict(r) for r in self.resume["rounds"]]
        first = self.resume["from_round"] + 1
        self.log_event({"kind": "resume", "from_round": first - 1, "time": time.time()})
        return first

    def _round(self, rnd: int, evaluator: Evaluator | None) -> None:
        self.fidelity.begin_round()
        before = self.network.counters()
        members, choice = self.pool.choose(
            self.roles["client"], {c: i["samples"] for c, i in self.shard_info.items()})
        t0 = time.perf_counter()
        attempts = 0
        for hook in self.hooks:  # e.g. a scenario's mid-round timers start here
            hook.round_started(self, rnd)
        while True:  # a node dying mid-round makes the round redo (testbed.run.recovery)
            attempts += 1
            try:  # a node that died between rounds shows at this broadcast
                self.control.broadcast(rnd, cmd="round", iters=self.iters,
                                       **({"clients": members} if members is not None else {}))
                self._doing = (rnd, attempts)
                self.show_progress()
                reports = self.control.collect("REPORT", rnd, self.cfg.timeouts.round_s,
                                               f"round {rnd}")
                break
            except NodesDead as e:
                console.print(f"[yellow]round {rnd}: {sorted(e.dead)} dead ({e.dead}); "
                              f"restarting from round {rnd - 1}'s checkpoints")
                if self.progress is not None:
                    self.progress.doing(f"round {rnd}: recovering {sorted(e.dead)}")
                try:
                    restarted = self.recovery.recover(rnd, e.dead)
                except NodesDead as again:
                    raise RunFailed(f"round {rnd}: a node died during recovery: {again}") from None
                self.control.rebase(restarted)
        wall = time.perf_counter() - t0
        ifaces = counter_delta(self.network.counters(), before)
        faithful = self.fidelity.end_round()
        self.pool.observe(reports)
        prev = self.control.baseline()
        nodes = {}
        for n, rep in reports.items():
            d = _delta(rep["proto"], prev.get(n, {}))
            # Everything a node reports (compute, scheme counters, received tensor names...)
            # except what is summed into the round's loss or turned into per-round deltas.
            own = {k: v for k, v in rep.items() if k not in ("proto", "loss_sum", "loss_n")}
            nodes[n] = {**own, **d}
        loss_n = sum(r["loss_n"] for r in reports.values())
        rec = {"round": rnd, "time": time.time(), "wall_s": wall, "iters": self.iters,
               "train_loss": sum(r["loss_sum"] for r in reports.values()) / max(loss_n, 1),
               "nodes": nodes, "interfaces": ifaces}
        if attempts > 1:
            rec["attempts"] = attempts
        if faithful is not None:
            rec["fidelity"] = faithful
        if choice:
            rec["selection"] = choice
        if self.pool.absent:
            rec["absent"] = sorted(self.pool.absent)
        with self.event_lock:  # the scenario timer may be adding one
            if self.events:
                rec["events"], self.events = self.events, []
        if evaluator:
            ckpts = {n: self.checkpoint_path(n) for n in self.node_configs}
            per_client = evaluator.evaluate(ckpts, self.parts)
            rec["test_acc_per_client"] = per_client
            rec["test_acc"] = sum(per_client.values()) / len(per_client)
        self.run_dir.append("rounds.jsonl", rec)
        self.rounds.append({**rec, "_proto": {n: r["proto"] for n, r in reports.items()}})
        console.print(round_line(rec, self.cfg.run.rounds))
        if self.on_round:
            self.on_round(self, rnd)

    def log_event(self, rec: dict[str, Any]) -> None:
        """An event, reaction or link state: events.jsonl, and (except position samples)
        the record of the round it happens in (or the next one, between rounds)."""
        rec = {**rec, "time": time.time()}
        with self.event_lock:
            if rec.get("kind") != "position":
                self.events.append(rec)
            self.run_dir.append("events.jsonl", rec)
        if line := record_line(rec):
            console.print(f"[cyan]scenario: {line}")

    def _plot(self) -> None:
        from testbed.run.records import plot_rounds

        try:
            plot_rounds(self.run_dir.path)
        except Exception as e:  # a plot must not fail a finished run
            console.print(f"[yellow]rounds.png not written: {e}")
        try:
            write_report(self.run_dir.path)
        except Exception as e:  # nor a report
            console.print(f"[yellow]report.md not written: {e}")

    def _install_routes(self) -> None:
        """The controller's host routes, before any node starts: between the hosts that talk
        on the data plane (the scheme's (dealer, router) pairs, hop by hop along chains), or
        all hosts (cfg.net.routes). On an L2 tree they pin what the switches would do anyway; on
        a routed topology (mesh) nothing crosses without them."""
        from testbed.emu.routing import Controller, RouteError

        if self.cfg.net.routes == "off":
            return
        self.controller = Controller(self.network, metric=self.cfg.net.route_metric,
                                     echo=console.print)
        pairs = None if self.cfg.net.routes == "all" else self.data_links
        try:
            self.controller.install(pairs)
        except RouteError as e:
            raise RunFailed(f"topology {self.topology!r}: {e}") from None

    def _routes(self) -> dict | None:
        ctl = self.controller
        if ctl is None:
            return None
        # Interface names per directed hop, to read the kernel counters of a path's hops.
        return {**ctl.state, "interfaces": {f"{a}->{b}": i for (a, b), i in ctl.intfs.items()}}

    def _linkcheck(self) -> None:
        from testbed.emu.linkcheck import format_rows, linkcheck

        with console.status("linkcheck: measuring every path"):
            rows = linkcheck(self.network, pings=50, iperf_s=2.0,
                             min_idle=self.cfg.fidelity.min_idle)
        self.run_dir.write_json("linkcheck.json", rows)
        console.print(format_rows(rows))
        bad = [r["pair"] for r in rows if not r["ok"]]
        if bad:
            console.print(f"[yellow]linkcheck: outside tolerance: {', '.join(bad)}")

    def _teardown(self) -> None:
        """Stop what this run started, once (run() calls it; so does leaving a `with`)."""
        if getattr(self, "_torn_down", False):
            return
        self._torn_down = True
        self.fidelity.stop()
        for hook in self.hooks:  # e.g. no link change while the network goes
            with suppress(Exception):
                hook.stop(self)
        stop_all(list(self.procs.values()))
        if self.launcher:
            with suppress(Exception):
                self.launcher.close()
        with suppress(Exception):
            self.forwarders.stop()
        self.control.close()
        if self._plane:
            self._plane.close()
        if self._zctx:
            self._zctx.term()
        if self.network:
            with suppress(Exception):
                self.network.stop()
        if self._ctl_dir:
            shutil.rmtree(self._ctl_dir, ignore_errors=True)
