"""What a run was made with: sledge, Python, torch, pyzmq/libzmq, the kernel and the git commit.

Recorded in every run's config.json so a result can be traced to its software; `sledge
--version` prints the first line. Reads only; never fails (a missing piece is None).
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def sledge_version() -> str:
    try:
        return metadata.version("sledge-testbed")
    except metadata.PackageNotFoundError:
        return "unknown"


def git_commit() -> str | None:
    """The checkout's commit (with "-dirty" if it has uncommitted changes), if it is one."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=5)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=5).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str | None]:
    import torch
    import zmq

    return {"sledge": sledge_version(), "python": platform.python_version(),
            "torch": torch.__version__, "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "kernel": platform.release(), "git": git_commit()}
