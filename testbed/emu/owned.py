"""Temporary paths a controller owns, named so that a later run can tell they are orphaned.

Every /tmp path sledge makes is `sledge-<kind>-<pid>-<random>`, `<pid>` being the controller
that made it. A controller killed with SIGKILL cannot remove its paths; the next one that makes
a path first removes those whose owner pid no longer runs (and only those: a path whose pid is
alive, or that does not follow the naming, is left alone). This module does not touch cgroups,
interfaces or processes (testbed.emu.network tears those down).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

TMP_PREFIX = "sledge-"
_OWNED = re.compile(r"^sledge-[a-z]+-(\d+)-[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def sweep_orphans(tmp: str | None = None) -> list[str]:
    """Remove the paths of controllers that died without cleaning up; return them."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    for name in os.listdir(tmp):
        m = _OWNED.match(name)
        if m is None or _alive(int(m.group(1))):
            continue
        path = os.path.join(tmp, name)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def owned_tmpdir(kind: str) -> str:
    """A new private directory `sledge-<kind>-<our pid>-XXXX`, after sweeping orphans."""
    sweep_orphans()
    return tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{kind}-{os.getpid()}-")
