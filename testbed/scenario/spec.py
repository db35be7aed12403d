"""One experiment file: everything a run needs, as data, and the Experiment it makes.

An experiment file (YAML) holds the topology (a script, the topology's name in it and its build
parameters), whether to run on loopback, the run configuration's sections (run, scheme, train,
data, model, net, devices, efficiency, fault, timeouts, security, fidelity, transport:
testbed.plan.config) and, optionally, a scenario timeline inline (or `run.scenario`, a file).
Relative paths are read from the file's folder. Every run folder gets the experiment.yaml that
reproduces it: `sledge run runs/<run>/experiment.yaml` runs the same experiment again
(docs/experiments.md).
Overrides (`--set`, command-line flags) are dotted or flat keys applied over the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.emu.topolib import Topo
from testbed.emu.topology import load_topology, script_of
from testbed.errors import ConfigError, read_yaml
from testbed.plan.config import FLAT, RunConfig, merge, nest
from testbed.scenario.timeline import Scenario, ScenarioError

ROOT = Path(__file__).resolve().parents[2]
# the file's own keys besides the config's sections; `cli`: when the command line opens a
# mininet> prompt (start | between_rounds | end), for `sledge run` only
SPEC_KEYS = ("topology", "loopback", "scenario", "cli")


@dataclass
class Prepared:
    """An experiment ready to construct: `Experiment(cfg, topo, **kwargs)`."""

    cfg: RunConfig
    topo: Topo
    topo_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    cli: str | None = None


def read(path: str) -> dict[str, Any]:
    """An experiment file as a mapping, its relative paths made absolute."""
    data = read_yaml(path, "experiment")
    if not isinstance(data, dict):
        raise ConfigError(f"experiment {path}: expected a mapping of sections, got {data!r}")
    if "topology" not in data:
        raise ConfigError(f"experiment {path}: no 'topology' (the topology script to run; a "
                          f"scenario timeline is given with --scenario or run.scenario)")
    base = os.path.dirname(os.path.abspath(path))
    topo = data.get("topology")
    if isinstance(topo, str):
        data["topology"] = topo = {"script": topo}
    if isinstance(topo, dict) and isinstance(topo.get("script"), str):
        topo["script"] = _resolve(script_of(topo["script"]), base)
    run = data.get("run")
    if isinstance(run, dict) and isinstance(run.get("scenario"), str):
        run["scenario"] = _resolve(run["scenario"], base)
    data["_base"] = base
    return data


def _resolve(p: str, base: str) -> str:
    """A path from the file's folder; else from the current folder or the project's."""
    for where in (base, os.getcwd(), str(ROOT)):
        cand = os.path.normpath(os.path.join(where, os.path.expanduser(p)))
        if os.path.exists(cand):
            return cand
    return os.path.normpath(os.path.join(base, p))


def prepare(spec: dict[str, Any], overrides: dict[str, Any] | None = None) -> Prepared:
    """The config, the built Topo and the Experiment's other arguments of an experiment (a
    file's mapping, or one made from a topology script), with `overrides` (dotted or flat
    keys; `topology.params.clients=3` too) applied."""
    spec = dict(spec)
    base = spec.pop("_base", os.getcwd())
    config = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    own: dict[str, Any] = {k: spec[k] for k in SPEC_KEYS if k in spec}
    for key, value in (overrides or {}).items():
        head = key.partition(".")[0]
        if head in SPEC_KEYS and head not in FLAT:
            own = merge(own, nest_plain(key, value))
        else:
            config[key] = value
    topo_ref = own.get("topology")
    if isinstance(topo_ref, str):
        topo_ref = {"script": topo_ref}
    if not isinstance(topo_ref, dict) or not isinstance(topo_ref.get("script"), str):
        raise ConfigError("experiment field 'topology': expected a topology script "
                          "(topology: topologies/tiny.py, or {script:, name:, params:})")
    unknown = sorted(set(topo_ref) - {"script", "name", "params"})
    if unknown:
        raise ConfigError(f"experiment field 'topology.{unknown[0]}': unknown field (valid: "
                          f"script, name, params)")
    params = topo_ref.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"experiment field 'topology.params': expected a mapping, got "
                          f"{params!r}")
    topo, topo_name = load_topology(topo_ref["script"], topo_ref.get("name"), params)
    nested = {}
    for key, value in config.items():
        nested = merge(nested, nest({key: value}))
    if not nested.get("run", {}).get("name"):
        scheme = nested.get("scheme", {}).get("name") or RunConfig().scheme.name
        scheme = re.sub(r"[^A-Za-z0-9_-]", "_", scheme.rpartition(":")[2])  # MyScheme of a ref
        nested = merge(nested, {"run": {"name": f"{topo_name}-{scheme}"}})
    cfg = RunConfig.from_dict(nested)
    kwargs: dict[str, Any] = {"topology": script_of(topo_ref["script"]), "loopback": bool(own.get(
        "loopback", False)), "topology_args": {"name": topo_name, "params": params}}
    if own.get("scenario") is not None:
        if cfg.run.scenario:
            raise ConfigError("experiment: a scenario inline and run.scenario (a file): "
                              "give one")
        try:
            kwargs["scenario"] = Scenario.from_dict(own["scenario"], os.path.join(
                base, "experiment.yaml"))
        except ScenarioError as e:
            raise ConfigError(f"experiment field 'scenario': {e}") from None
    cli = own.get("cli")
    if cli not in (None, "start", "between_rounds", "end"):
        raise ConfigError(f"experiment field 'cli': expected start, between_rounds or end, got "
                          f"{cli!r}")
    return Prepared(cfg, topo, topo_name, kwargs, cli)


def nest_plain(key: str, value: Any) -> dict[str, Any]:
    *parents, leaf = key.split(".")
    out: dict[str, Any] = {leaf: value}
    for p in reversed(parents):
        out = {p: out}
    return out


def from_script(script: str, name: str | None = None, params: dict[str, Any] | None = None,
                loopback: bool | None = None) -> dict[str, Any]:
    """The experiment mapping of a topology script given on the command line."""
    spec: dict[str, Any] = {"topology": {"script": script, "name": name,
                                         "params": params or {}}}
    if loopback is not None:
        spec["loopback"] = loopback
    return spec

