"""`sledge`: the command line. Parses arguments, loads topology scripts, runs experiments.

    sledge run TOPOLOGY.py [--scheme psl] [--rounds N] [-p bw=10] ...
    sledge compare [TOPOLOGY.py] [--schemes fl psl epsl:phi=0.5 ...] [--rounds N]
    sledge caps

Every error ends here, as one line on stderr: exit 2 for bad input (the line names the field or
file), 1 for a run that failed, 130 when interrupted; `--debug` adds the traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from dataclasses import fields

from testbed.cli.options import HETEROGENEITY, _add_device_args
from testbed.emu.topology import _one_line, load_topology, parse_params
from testbed.errors import ConfigError
from testbed.plan.config import RunConfig
from testbed.run.versions import sledge_version


def _add_run_args(p: argparse.ArgumentParser) -> None:
    d = RunConfig()
    p.add_argument("topology", help="topology script, e.g. topologies/tiny.py")
    p.add_argument("--topo", help="topology name inside the script (default: its first)")
    p.add_argument("-p", "--topo-param", action="append", default=[], metavar="KEY=VALUE",
                   help="topology build parameter, e.g. -p bw=10 -p clients=3")
    p.add_argument("--scheme", default=d.scheme,
                   help="sl, sflv1, sflv2 (need a fedserver host: -p fed=True), psl, epsl, fl")
    p.add_argument("-o", "--scheme-option", action="append", default=[], metavar="KEY=VALUE",
                   help="scheme option, e.g. -o phi=0.5 -o u_shaped=True (U-shaped needs two "
                        "--cut); each scheme's options are listed in its nodes/schemes/ file")
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--iters", dest="iters_per_round", type=int, default=None,
                   help="iterations per round (default: one local epoch)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--dataset", default=d.dataset)
    p.add_argument("--data-root", default=None)
    p.add_argument("--train-limit", type=lambda s: None if s == "none" else int(s),
                   default=d.train_limit, help="train samples used (or 'none' for all)")
    p.add_argument("--test-limit", type=lambda s: None if s == "none" else int(s),
                   default=d.test_limit)
    p.add_argument("--partition", default=d.partition, choices=["iid", "dirichlet"])
    p.add_argument("--alpha", type=float, default=d.alpha)
    p.add_argument("--model", default=d.model)
    p.add_argument("--cut", dest="cuts", action="append", help="cut point (repeatable)")
    p.add_argument("--tier", dest="tiers", action="append",
                   help="role of a relay tier between clients and server, client side first "
                        "(repeatable; needs more --cut than --tier): docs/multitier.md")
    p.add_argument("--role", dest="role_items", action="append", default=[],
                   metavar="HOST=ROLE", help="override a host's role, e.g. --role v2=hop1")
    p.add_argument("--routes", default=d.routes, choices=["scheme", "all", "off"],
                   help="controller routes on Mininet: between the data-plane peers, all "
                        "hosts, or none")
    p.add_argument("--route-metric", default=d.route_metric, choices=["widest", "shortest"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--name", default=None, help="run name (default: topology-scheme)")
    p.add_argument("--out", dest="out_dir", default=d.out_dir)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--step-timeout", dest="step_timeout_s", type=float, default=d.step_timeout_s)
    p.add_argument("--heartbeat-s", type=float, default=d.heartbeat_s,
                   help="node heartbeat period; dead after --heartbeat-misses silent beats")
    p.add_argument("--heartbeat-misses", type=int, default=d.heartbeat_misses)
    p.add_argument("--insecure", action="store_true",
                   help="no CURVE keys on the sockets: any local process may connect "
                        "(docs/security.md)")
    p.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes,
                   help="largest frame a node accepts (0: derived from the run)")
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="live connections per listening socket (0: derived from the run)")
    p.add_argument("--max-restarts", type=int, default=d.max_restarts,
                   help="node restarts a run may use (0: a dead node fails the run); "
                        "docs/fault-tolerance.md")
    p.add_argument("--no-eval", dest="evaluate", action="store_false")
    p.add_argument("--launcher", default=d.launcher, choices=["popen", "zygote"],
                   help="popen: an interpreter per node; zygote: nodes forked from a warm process")
    p.add_argument("--link-backend", default=d.link_backend, choices=["auto", "netem", "relay"])
    p.add_argument("--scenario", metavar="FILE",
                   help="scenario timeline (YAML): moves, handovers, link changes and failures "
                        "during the run, e.g. scenarios/mesh_link_cut.yaml (docs/scenarios.md)")
    p.add_argument("--linkcheck", action="store_true",
                   help="measure every path (ping, iperf3) before training; stored with the run")
    p.add_argument("--loopback", action="store_true",
                   help="no Mininet, no emulation: all nodes on 127.0.0.1 (scheme development)")
    p.add_argument("--allocate", default="off", choices=["off", "static", "on-demand"],
                   help="PSL/EPSL: the resource manager picks the cut (and, static, each UE's "
                        "share of its cell, set on per-UE links); needs --cycles: "
                        "docs/latency.md")
    _add_device_args(p)


def config_from_args(a: argparse.Namespace, topo_name: str) -> RunConfig:
    names = {f.name for f in fields(RunConfig)}
    d = {k: v for k, v in vars(a).items() if k in names and v is not None}
    d["scheme_options"] = parse_params(a.scheme_option, "--scheme-option")
    for f, flag in HETEROGENEITY.items():
        d[f] = parse_params(getattr(a, f"{f}_items"), f"--{flag}")
    d["roles"] = parse_params(a.role_items, "--role")
    d["compression"] = parse_params(a.compress_items, "--compress")
    d["selection"] = parse_params(a.select_items, "--select")
    own: dict[str, dict] = {}
    for key, flag in (("bits", "--client-bits"), ("prune", "--client-prune")):
        for host, v in parse_params(getattr(a, f"client_{key}_items"), flag).items():
            own.setdefault(host, {})[key] = v
    d["client_weights"] = own
    d["name"] = a.name or f"{topo_name}-{a.scheme}"
    return RunConfig.from_dict(d)


def cmd_run(a: argparse.Namespace) -> int:
    from testbed.run.records import console
    from testbed.scenario.experiment import Experiment

    params = parse_params(a.topo_param, "-p")
    topo, topo_name = load_topology(a.topology, a.topo, params)
    cfg = config_from_args(a, topo_name)
    on_start = None
    if a.allocate != "off":
        from testbed.plan.resources import allocate_run

        try:
            cfg, on_start = allocate_run(topo, cfg, a.allocate, log=console.print)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    Experiment(cfg, topo, topology=a.topology, loopback=a.loopback, on_start=on_start,
               topology_args={"name": topo_name, "params": params}).run()
    return 0


def cmd_resume(a: argparse.Namespace) -> int:
    """Continue an interrupted run in its folder from the last round it recorded."""
    from testbed.run.records import console
    from testbed.run.recovery import resume_state
    from testbed.scenario.experiment import Experiment

    try:
        state = resume_state(a.run)
    except ValueError as e:
        raise ConfigError(f"resume: {e}") from None
    r = state["resolved"]
    targs = r.get("topology_args") or {}
    topo, _ = load_topology(r["topology"], targs.get("name"), targs.get("params") or {})
    cfg = RunConfig.from_dict(r["config"])
    for line in state.get("notes", []):
        console.print(f"[yellow]{line}")
    console.print(f"resuming {a.run} after round {state['from_round']} of {cfg.rounds}")
    Experiment(cfg, topo, topology=r["topology"], loopback=bool(r.get("loopback")),
               topology_args=targs, resume=state).run()
    return 0


def cmd_caps(_: argparse.Namespace) -> int:
    from testbed.emu.capabilities import probe

    print("\n".join(probe().describe()))
    return 0


def cmd_linkcheck(a: argparse.Namespace) -> int:
    from testbed.emu.capabilities import probe
    from testbed.emu.linkcheck import Tolerance, format_rows, linkcheck
    from testbed.emu.network import build_network

    topo, _ = load_topology(a.topology, a.topo, parse_params(a.topo_param, "-p"))
    caps = probe()
    print("\n".join(caps.describe()))
    network = build_network(topo, caps)
    try:
        rows = linkcheck(network, pings=a.pings, iperf_s=a.iperf_s,
                         tol=Tolerance(goodput_min=a.goodput_min))
    finally:
        network.stop()
    print(format_rows(rows))
    bad = [r["pair"] for r in rows if not r["ok"]]
    if bad:
        print(f"linkcheck: outside tolerance: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sledge", description="split learning over an emulated edge")
    p.add_argument("--version", action="version", version=f"sledge {sledge_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run one experiment on a topology")
    _add_run_args(r)
    r.set_defaults(func=cmd_run)
    lc = sub.add_parser("linkcheck", help="measure every path: configured vs measured")
    lc.add_argument("topology")
    lc.add_argument("--topo")
    lc.add_argument("-p", "--topo-param", action="append", default=[], metavar="KEY=VALUE")
    lc.add_argument("--pings", type=int, default=200)
    lc.add_argument("--iperf-s", type=float, default=3.0, help="iperf3 seconds (0: skip)")
    lc.add_argument("--goodput-min", type=float, default=0.90,
                    help="least TCP goodput / configured rate that passes")
    lc.set_defaults(func=cmd_linkcheck)
    rs = sub.add_parser("resume", help="continue an interrupted run from its last round")
    rs.add_argument("run", help="the run folder (runs/<time>-<name>)")
    rs.set_defaults(func=cmd_resume)
    c = sub.add_parser("caps", help="print what this kernel offers for link emulation")
    c.set_defaults(func=cmd_caps)
    from testbed.cli.compare import add_parser as add_compare

    add_compare(sub)
    from testbed.cli.scenario import add_parser as add_scenario

    add_scenario(sub)
    debug = "show the traceback of an error (default: one line naming the field or file)"
    p.add_argument("--debug", action="store_true", help=debug)
    for command in sub.choices.values():  # after the command too: sledge run ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=debug)
    return p


class _ConsoleLog(logging.Handler):
    """Warnings of the controller's own sockets (nodes.protocol) through the console, so each
    is a line of its own above the live status line, not text run into a round line."""

    def emit(self, record: logging.LogRecord) -> None:
        from testbed.run.records import console

        console.print(f"warning: {self.format(record)}", style="yellow", markup=False,
                      highlight=False)


def _error(e: BaseException) -> tuple[int, str]:
    """Exit code and the one line that say what went wrong."""
    try:
        from testbed.errors import RunFailed
    except Exception:  # what failed may be that import itself: say so, one line
        RunFailed = RuntimeError  # noqa: N806
    if isinstance(e, ConfigError):  # before RunFailed: a refused run is bad input
        return 2, " ".join(str(e).split())
    if isinstance(e, PermissionError) and not e.filename:  # e.g. Mininet needs root
        return 2, str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return 1, f"run failed: {e.filename or 'a write'}: No space left on device"
    if isinstance(e, RunFailed):
        return 1, f"run failed: {e}"
    if isinstance(e, OSError) and e.filename:
        return 1, f"run failed: {e.filename}: {e.strerror or e}"
    return 1, f"internal error: {_one_line(e)} (sledge --debug shows where)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    handler = _ConsoleLog(logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sledge: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        code, line = _error(e)
        if debug:
            traceback.print_exc()
            if detail := getattr(e, "detail", ""):
                print(detail, file=sys.stderr)
        print(f"sledge: {line}", file=sys.stderr)
        return code
    finally:
        logging.getLogger().removeHandler(handler)


def topology_main(path: str) -> None:
    """`python topologies/x.py [run options]`: a topology script run on its own."""
    sys.exit(main(["run", path, *sys.argv[1:]]))

