"""Loading a topology script: Mininet's `--custom` convention (a TOPOS dict) and `-p k=v` params.

Imports the user's script and builds its Topo, with errors that name the script's own line;
it does not build a network (testbed.emu.network does) or know about runs.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import os
import traceback
from pathlib import Path
from typing import Any

from testbed.emu.topolib import Topo
from testbed.errors import ConfigError


def parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_params(items: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = parse_value(value)
    return out


TOPOLOGIES = Path(__file__).resolve().parents[2] / "topologies"


def known_topologies() -> list[str]:
    """The names of the topology scripts that come with sledge (topologies/*.py)."""
    return sorted(p.stem for p in TOPOLOGIES.glob("*.py") if not p.name.startswith("_"))


def script_of(path: str) -> str:
    """A topology script's path: as given, or the one of that name in topologies/ ("tiny")."""
    if os.path.isfile(path) or os.sep in path or path.endswith(".py"):
        return path
    cand = TOPOLOGIES / f"{path}.py"
    return str(cand) if cand.is_file() else path


def load_topology(path: str, name: str | None = None,
                  params: dict[str, Any] | None = None) -> tuple[Topo, str]:
    """Import a topology script (a path, or a name in topologies/: "tiny") and build its Topo
    (Mininet's --custom convention: TOPOS)."""
    path = script_of(path)
    if not os.path.isfile(path):
        raise ConfigError(f"topology: no such file {path!r} (nor a topology of that name: "
                          f"{', '.join(known_topologies())})")
    spec = importlib.util.spec_from_file_location(f"sledge_topo_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"topology {path}: not a Python script (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"topology {path}, line {e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:  # the script's own error, whatever it is: name the script's line
        raise ConfigError(f"topology {path}{_script_line(e, path)}: importing it raised "
                          f"{_one_line(e)}") from e
    topos = getattr(module, "TOPOS", None)
    if not isinstance(topos, dict) or not topos:
        raise ConfigError(f"topology {path}: defines no TOPOS = {{'name': TopoClass}}")
    name = name or next(iter(topos))
    if name not in topos:
        raise ConfigError(f"topology {path}: no topology {name!r}; has {sorted(topos)}")
    cls = topos[name]
    params = params or {}
    accepted = inspect.signature(cls.build).parameters
    unknown = [k for k in params if k not in accepted]
    if unknown:
        valid = [k for k in accepted if k != "self"]
        raise ConfigError(f"topology {name}: unknown parameter(s) {unknown}; valid: {valid}")
    try:
        return cls(**params), name
    except Exception as e:
        raise ConfigError(f"topology {path}{_script_line(e, path)}: building {name!r} with "
                          f"{params or 'defaults'} raised {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _script_line(e: BaseException, path: str) -> str:
    """', line N' of the deepest frame of the traceback inside the script `path`."""
    where = ""
    for frame in traceback.extract_tb(e.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            where = f", line {frame.lineno}"
    return where
