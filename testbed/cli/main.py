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
from typing import Any

from testbed.cli.options import add_run_options, overrides
from testbed.emu.topology import _one_line, load_topology, parse_params
from testbed.errors import ConfigError
from testbed.plan.config import Fidelity, RunConfig
from testbed.run.versions import sledge_version
from testbed.scenario.spec import Prepared, from_script, prepare, read

CLI_MOMENTS = ("start", "between_rounds", "end")


def prepared(a: argparse.Namespace) -> Prepared:
    """The experiment the command line names: a file or a topology script, with overrides."""
    if a.experiment.endswith((".yaml", ".yml")):
        spec = read(a.experiment)
        if a.topo or a.topo_param:
            topo = spec.get("topology") if isinstance(spec.get("topology"), dict) else {}
            spec["topology"] = {**topo, **({"name": a.topo} if a.topo else {}), "params": {
                **(topo.get("params") or {}), **parse_params(a.topo_param, "-p")}}
        if a.loopback:
            spec["loopback"] = True
    else:
        spec = from_script(a.experiment, a.topo, parse_params(a.topo_param, "-p"), a.loopback)
    return prepare(spec, overrides(a))


def cmd_run(a: argparse.Namespace) -> int:
    from testbed.run.records import console
    from testbed.scenario.experiment import Experiment

    p = prepared(a)
    cfg, on_start = p.cfg, None
    if a.allocate != "off":
        from testbed.plan.resources import allocate_run

        try:
            cfg, on_start = allocate_run(p.topo, cfg, a.allocate, log=console.print)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    when = a.cli or p.cli
    if when and p.kwargs.get("loopback"):
        console.print(f"--cli {when}: no mininet> prompt on the loopback network (there is no "
                      f"emulated network to look at)")
    elif when:
        p.kwargs["on_ready" if when == "start" else "on_round"] = prompt(when)
    with Experiment(cfg, p.topo, on_start=on_start, **p.kwargs) as exp:
        exp.run()
    return 0


def prompt(when: str) -> Any:
    """Mininet's own CLI on the run's network, with the nodes up: at the start (before round 1,
    the nodes wait idle), between rounds (after each but the last) or at the end (after the last
    round, before teardown). Leave it (exit, Ctrl-D) to go on."""
    from mininet.cli import CLI
    from mininet.log import lg, setLogLevel

    from testbed.run.records import console

    def open_cli(exp: Any, rnd: int | None = None) -> None:
        last = exp.cfg.run.rounds
        if rnd is not None and (rnd == last) != (when == "end"):
            return
        moment = ("before round 1" if rnd is None else "after the last round" if rnd == last
                  else f"after round {rnd} of {last}")
        console.print(f"[bold]mininet> with the nodes up, {moment}: pingall, iperf c1 srv, "
                      f"link c1 s1 down, c1 ip addr, ... ; exit (or Ctrl-D) to go on")
        if exp.progress is not None:  # the live progress line must not draw over the prompt
            exp.progress.bar.stop()
        net = exp.network.net
        # pingall and friends over the topology's hosts: a link's relay node (no IP) is
        # still there by name (x1 ...), not among the hosts that ping each other.
        hosts, net.hosts = net.hosts, [net.get(h) for h in exp.topo.hosts()]
        level = lg.level
        setLogLevel("info")  # as `mn` does: the prompt's commands print through Mininet's log
        try:
            CLI(net)
        finally:
            lg.setLevel(level)
            net.hosts = hosts
            if exp.progress is not None:
                exp.progress.bar.start()

    return open_cli


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
    console.print(f"resuming {a.run} after round {state['from_round']} of {cfg.run.rounds}")
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
                         tol=Tolerance(goodput_min=a.goodput_min),
                         min_idle=Fidelity().min_idle)  # the run's rule, as `run --linkcheck`
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
    r = sub.add_parser("run", help="run one experiment (a file, or a topology script)",
                       description="Run one experiment: an experiment file (YAML, examples/) "
                       "or a topology script with options.")
    add_run_options(r)
    r.add_argument("--allocate", default="off", choices=["off", "static", "on-demand"],
                   help="PSL/EPSL: the resource manager picks the cut (and, static, each UE's "
                        "share of its cell); needs modelled compute (devices.cycles): "
                        "docs/latency.md")
    r.add_argument("--cli", nargs="?", const="start", choices=CLI_MOMENTS,
                   help="Mininet's mininet> prompt on the run's network with the nodes up: at "
                        "the start (default), between rounds or at the end; `cli:` in an "
                        "experiment file")
    r.add_argument("--scheme", metavar="NAME,K=V",
                   help=f"scheme and its options, e.g. epsl,phi=0.5 (default: "
                        f"{RunConfig().scheme.name}; `sledge list schemes`)")
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
    from testbed.cli.listing import add_parser as add_list

    add_list(sub)
    debug = "show the traceback of an error (default: one line naming the field or file)"
    p.add_argument("--debug", action="store_true", help=debug)
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="more log lines (-v: info, -vv: debug)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="nothing on the console but errors (the run folder has everything)")
    for command in sub.choices.values():  # after the command too: sledge run ... --debug
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help=debug)
        command.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
        command.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help=argparse.SUPPRESS)
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
    verbose, quiet = int(getattr(args, "verbose", 0)), bool(getattr(args, "quiet", False))
    level = (logging.ERROR if quiet else logging.DEBUG if verbose > 1 else
             logging.INFO if verbose else logging.WARNING)
    handler = _ConsoleLog(level)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(min(old_level or logging.WARNING, level))
    from testbed.run.records import console

    was_quiet, console.quiet = console.quiet, quiet or console.quiet
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
        root.removeHandler(handler)
        root.setLevel(old_level)
        console.quiet = was_quiet


def topology_main(path: str) -> None:
    """`python topologies/x.py [run options]`: a topology script run on its own."""
    sys.exit(main(["run", path, *sys.argv[1:]]))

