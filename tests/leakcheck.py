"""What a run or a test may leave behind on this machine, and a check that nothing was.

Used three ways: per test (tests/conftest.py: every `net` test, and tests asking for
`no_leaks`), once per pytest session, and by scripts/test.sh around the whole suite
(`python tests/leakcheck.py snapshot FILE` before, `... compare FILE` after: exit 1 and one line
per kind on a leak). It only reads: it never removes anything, so a leak stays to be looked at.

Kinds: network interfaces (veths, bridges, dummies) of the root namespace, named network
namespaces, cgroup directories in every mounted hierarchy (cpu, cpuacct, cpuset, memory, ...;
v1 or v2, separate or co-mounted), processes (this process's children, and anywhere on the
machine node/zygote/relay/mnexec/QEMU processes), and /tmp/sledge-* paths.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import psutil

CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_DEPTH = 3  # Mininet's <hier>/<host>, ours <hier>/<own group>/sledge-<pid>-<host>
# Processes of ours wherever they run (a node re-parented to init after its parent died):
# command lines that only sledge, Mininet or a guest of ours start.
OURS = ("-m nodes", "testbed.run.zygote", "testbed.emu.relay", "mnexec", "qemu-system")


def _cgroup_dirs() -> set[str]:
    out: set[str] = set()
    if not os.path.isdir(CGROUP_ROOT):
        return out
    for dirpath, dirnames, _ in os.walk(CGROUP_ROOT, followlinks=False):
        depth = dirpath[len(CGROUP_ROOT):].count("/")
        if depth >= 2:  # <root>/<hierarchy>/<group>: a group; the hierarchies themselves are not
            out.add(dirpath)
        if depth > CGROUP_DEPTH:
            dirnames.clear()
    return out


# Python's own helper, started once per interpreter by multiprocessing's spawn context and
# ended with it: not something a run or a test leaves behind.
RESOURCE_TRACKER = "multiprocessing.resource_tracker"


def _processes() -> set[str]:
    me = psutil.Process()
    found: dict[int, str] = {}
    for p in me.children(recursive=True):
        try:
            cmd = p.cmdline()
            if (p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                    and not any(RESOURCE_TRACKER in c for c in cmd)):
                found[p.pid] = " ".join(cmd[:4])
        except psutil.Error:
            continue
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != me.pid and any(tag in cmd for tag in OURS):
            found.setdefault(p.pid, " ".join((p.info["cmdline"] or [])[:4]))
    return {f"{pid} {cmd}" for pid, cmd in found.items()}


def system_state() -> dict[str, set[str]]:
    """Everything of the kinds above that exists now."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {
        "interfaces": {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()},
        "netns": {line.split()[0] for line in netns.splitlines() if line.strip()},
        "cgroups": _cgroup_dirs(),
        "processes": _processes(),
        "tmp_paths": set(glob.glob("/tmp/sledge-*")),
    }


def _foreign(cgroup: str, ours: set[int]) -> bool:
    """A group holding a live process that is not ours belongs to someone else on this machine
    (e.g. a sandbox that makes a memory group per command): not a leak of ours. Empty groups,
    or groups holding our processes, are."""
    try:
        with open(os.path.join(cgroup, "cgroup.procs")) as f:
            pids = {int(x) for x in f.read().split()}
    except (OSError, ValueError):
        return False
    return bool(pids - ours)


def leaked(before: dict[str, set[str]], after: dict[str, set[str]] | None = None
           ) -> dict[str, list[str]]:
    """What exists now (or in `after`) that did not in `before`, by kind."""
    after = system_state() if after is None else after
    out = {k: sorted(after[k] - before.get(k, set())) for k in after
           if after[k] - before.get(k, set())}
    if "cgroups" in out:
        ours = {os.getpid(), *(int(p.split()[0]) for p in after["processes"])}
        out["cgroups"] = [c for c in out["cgroups"] if not _foreign(c, ours)]
        if not out["cgroups"]:
            del out["cgroups"]
    return out


def describe(leaks: dict[str, list[str]]) -> str:
    return "; ".join(f"{len(v)} {k}: {', '.join(v[:6])}{' ...' if len(v) > 6 else ''}"
                     for k, v in leaks.items())


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("snapshot", "compare"):
        print("usage: leakcheck.py snapshot|compare FILE", file=sys.stderr)
        return 2
    cmd, path = argv
    if cmd == "snapshot":
        with open(path, "w") as f:
            json.dump({k: sorted(v) for k, v in system_state().items()}, f)
        return 0
    with open(path) as f:
        before = {k: set(v) for k, v in json.load(f).items()}
    leaks = leaked(before)
    if leaks:
        print(f"leak check: left behind by the test suite: {describe(leaks)}", file=sys.stderr)
        return 1
    print("leak check: nothing left behind")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
