"""cli: the `sledge` command: argparse, error lines and exit codes; nothing imports it.

`sledge run`, `resume`, `caps`, `linkcheck` (main), `compare` (compare), `scenario` (scenario)
and the options they share (options). Everything it does is reachable from the API below it.
"""

from testbed.cli.main import main

__all__ = ["main"]
