"""The errors every layer raises and the command line maps to exit codes (2: bad input, 1: failed).

Below every package (it imports nothing of sledge): a ConfigError names the field or file that is
wrong; a RunFailed says which node or step failed and why. `read_yaml` reads a YAML input file
with errors that name it.
"""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """Bad input: the message names the field or file."""


class RunFailed(RuntimeError):
    """The run could not complete; the message says which node or step and why. `detail`
    (e.g. a node's traceback) is shown by `sledge --debug` only."""

    detail: str = ""


class BadInput(RunFailed, ConfigError):
    """The run was refused before any node started: the message names the field or file. A
    RunFailed for callers that catch those, a ConfigError (exit 2) for the command line."""


class NodesDead(RunFailed):
    """Nodes died (process exit or missed heartbeats): testbed.run.recovery may redo the round."""

    def __init__(self, dead: dict[str, str], detail: str) -> None:
        super().__init__(detail)
        self.dead = dead


def read_yaml(path: str, what: str, error: type[Exception] = ConfigError) -> Any:
    """A YAML file's content; a missing file or bad YAML raises `error` naming `what` and it."""
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise error(f"{what} {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise error(f"{what} {path}: not valid YAML ({' '.join(str(e).split())})") from None
