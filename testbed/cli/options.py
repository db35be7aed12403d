"""The options `sledge run` and `sledge compare` share, and how they become an experiment.

A dozen direct flags in groups, `--set KEY=VALUE` for any field of the experiment (dotted,
`train.lr=0.1`, or a flat name, `lr=0.1`), and the `name,k=v` spec syntax of Mininet's
customClass for things that have a name and options: `--scheme epsl,phi=0.5`, `--compress
c3sl,R=4`, `--select rpowd,m=2,d=3`. The flags of earlier releases still work (hidden from
--help; each is a `--set` of one field). Precedence: the experiment file, then --set, then
the direct flags, each applied only when given.
"""

from __future__ import annotations

import argparse
from typing import Any

from testbed.emu.topology import parse_params, parse_value
from testbed.errors import ConfigError
from testbed.plan.config import RunConfig

D = RunConfig()


def parse_spec(items: list[str], name_key: str, flag: str) -> dict[str, Any]:
    """`name,k=v,...` items (repeatable; a later item adds to or overrides the earlier ones)
    -> {name_key: name, k: v}. A bare `k=v` item is accepted too (`--compress method=c3sl`)."""
    out: dict[str, Any] = {}
    for item in items or []:
        for i, token in enumerate(t.strip() for t in item.split(",") if t.strip()):
            key, sep, value = token.partition("=")
            if not sep:
                if i:
                    raise ConfigError(f"{flag} {item!r}: {token!r} must be KEY=VALUE (only the "
                                      f"first entry may be a bare name)")
                out[name_key] = token
            elif not key:
                raise ConfigError(f"{flag} {item!r}: expected NAME,KEY=VALUE,...")
            else:
                out[key] = parse_value(value)
    return out


def _limit(s: str) -> int | None:
    return None if s.lower() in ("none", "null", "all") else int(s)


# Flags of earlier releases: flag -> (flat field, how to read the value; "items" = KEY=VALUE
# repeatable into a mapping, "append" = repeatable into a list, "true"/"false" = switches).
LEGACY: dict[str, tuple[str, Any]] = {
    "--iters": ("iters_per_round", int), "--batch-size": ("batch_size", int),
    "--lr": ("lr", float), "--momentum": ("momentum", float), "--data-root": ("data_root", str),
    "--train-limit": ("train_limit", _limit), "--test-limit": ("test_limit", _limit),
    "--partition": ("partition", str), "--alpha": ("alpha", float),
    "--tier": ("tiers", "append"), "--role": ("roles", "items"), "--routes": ("routes", str),
    "--route-metric": ("route_metric", str), "--port": ("port", int),
    "--step-timeout": ("step_timeout_s", float), "--heartbeat-s": ("heartbeat_s", float),
    "--heartbeat-misses": ("heartbeat_misses", int), "--insecure": ("insecure", "true"),
    "--max-message-bytes": ("max_message_bytes", int),
    "--max-connections": ("max_connections", int), "--max-restarts": ("max_restarts", int),
    "--no-eval": ("evaluate", "false"), "--launcher": ("launcher", str),
    "--link-backend": ("link_backend", str), "--linkcheck": ("linkcheck", "true"),
    "--cpu": ("cpu", "items"), "--mem-mb": ("mem_mb", "items"), "--cycles": ("cycles", "items"),
    "--flops-per-cycle": ("flops_per_cycle", float),
    "--backward-flops-factor": ("backward_flops_factor", float),
    "--client-bits": ("client_weights.bits", "items"),
    "--client-prune": ("client_weights.prune", "items"),
}


def add_run_options(p: argparse.ArgumentParser, *, default_experiment: str | None = None
                    ) -> None:
    """The experiment's options; `default_experiment`: the file used when none is given."""
    g = p.add_argument_group("experiment")
    g.add_argument("experiment", nargs="?" if default_experiment else None,
                   default=default_experiment, metavar="EXPERIMENT",
                   help="an experiment file (YAML: topology, scheme, data, model, scenario...; "
                        "examples/) or a topology script (topologies/*.py)"
                        + (f" (default: {default_experiment})" if default_experiment else ""))
    g.add_argument("--topo", help="topology name inside the script (default: its first)")
    g.add_argument("-p", "--topo-param", action="append", default=[], metavar="KEY=VALUE",
                   help="topology build parameter, e.g. -p bw=10 -p clients=3")
    g = p.add_argument_group("training")
    g.add_argument("--rounds", type=int, help=f"training rounds (default: {D.run.rounds})")
    g.add_argument("--dataset", help=f"data set (default: {D.data.dataset}; `sledge list "
                                     f"datasets`)")
    g.add_argument("--model", help=f"model (default: {D.model.name}; `sledge list models`)")
    g.add_argument("--cut", dest="cuts", action="append", metavar="NAME",
                   help=f"cut point, client side first (repeatable; default: "
                        f"{', '.join(D.model.cuts)}; `sledge list cuts`)")
    g = p.add_argument_group("network")
    g.add_argument("--loopback", action="store_true", default=None,
                   help="no Mininet, no emulation: all nodes on 127.0.0.1 (scheme development)")
    g.add_argument("--scenario", metavar="FILE",
                   help="scenario timeline (YAML): moves, handovers, link changes and failures "
                        "during the run (docs/scenarios.md)")
    g = p.add_argument_group("efficiency")
    g.add_argument("--compress", dest="compress_items", action="append", default=[],
                   metavar="METHOD,K=V", help="cut compression, e.g. c3sl,R=4 | topk,rho=0.1 | "
                                              "quant,bits=8 (docs/compression.md)")
    g.add_argument("--select", dest="select_items", action="append", default=[],
                   metavar="POLICY,K=V", help="client selection per round, e.g. "
                                              "rpowd,m=2,d=3")
    g = p.add_argument_group("output")
    g.add_argument("--out", dest="out_dir", help=f"folder of run folders (default: "
                                                 f"{D.run.out_dir})")
    g.add_argument("--name", help="run name (default: <topology>-<scheme>)")
    g.add_argument("--seed", type=int, help=f"seed of data, partition and weights (default: "
                                             f"{D.run.seed})")
    g = p.add_argument_group("any other field")
    g.add_argument("--set", dest="set_items", action="append", default=[],
                   metavar="KEY=VALUE", help="any field of the experiment, dotted or flat, e.g. "
                   "--set train.lr=0.1 --set devices.cycles.client=3e8 --set "
                   "security.insecure=true (sections: run, scheme, train, data, model, net, "
                   "devices, efficiency, fault, timeouts, security, fidelity, transport; "
                   "docs/experiments.md)")
    for flag, (field, kind) in LEGACY.items():
        if kind in ("true", "false"):
            p.add_argument(flag, dest=f"legacy:{field}", action="store_const",
                           const=kind == "true", default=None, help=argparse.SUPPRESS)
        elif kind in ("items", "append"):
            p.add_argument(flag, dest=f"legacy:{field}", action="append", default=None,
                           help=argparse.SUPPRESS)
        else:
            p.add_argument(flag, dest=f"legacy:{field}", type=kind, default=None,
                           help=argparse.SUPPRESS)
    p.add_argument("-o", "--scheme-option", dest="scheme_option", action="append", default=[],
                   help=argparse.SUPPRESS)


def overrides(a: argparse.Namespace) -> dict[str, Any]:
    """What the command line sets, as dotted or flat keys (nothing for a flag not given)."""
    out: dict[str, Any] = {}
    for item in a.set_items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=0.1")
        out[key] = _yaml_value(value)
    for key, value in vars(a).items():
        if not key.startswith("legacy:") or value is None:
            continue
        field = key.removeprefix("legacy:")
        flag = next(f for f, (k, _) in LEGACY.items() if k == field)
        kind = LEGACY[flag][1]
        if kind == "items":
            if field.startswith("client_weights."):  # --client-bits HOST=8 per host or role
                attr = field.split(".")[1]
                for host, v in parse_params(value, flag).items():
                    out[f"devices.client_weights.{host}.{attr}"] = v
                continue
            out.update({f"{field}.{k}": v for k, v in parse_params(value, flag).items()})
        else:
            out[field] = value
    for key in ("rounds", "dataset", "model", "cuts", "scenario", "out_dir", "name", "seed"):
        if getattr(a, key, None) is not None:
            out[key] = getattr(a, key)
    if a.compress_items:
        out["compression"] = parse_spec(a.compress_items, "method", "--compress")
    if a.select_items:
        out["selection"] = parse_spec(a.select_items, "policy", "--select")
    if getattr(a, "scheme", None):
        spec = parse_spec([a.scheme], "name", "--scheme")
        out["scheme.name"] = spec.pop("name", D.scheme.name)
        out.update({f"scheme.options.{k}": v for k, v in spec.items()})
    out.update({f"scheme.options.{k}": v
                for k, v in parse_params(a.scheme_option, "--scheme-option").items()})
    return out


def _yaml_value(text: str) -> Any:
    """A --set value: a Python literal (3e8, 0.1, [1, 2]), else as YAML reads it (true, null,
    [a, b], {k: v}), else the string."""
    import yaml

    value = parse_value(text)
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
