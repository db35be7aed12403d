"""`python -m nodes --config FILE`: run one node process from a JSON config."""

import argparse
import sys

from nodes.nodeconfig import read
from nodes.runtime import run_node


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m nodes", description=__doc__)
    p.add_argument("--config", required=True, help="node config (JSON) written by the testbed")
    args = p.parse_args()
    return run_node(read(args.config))


if __name__ == "__main__":
    sys.exit(main())
