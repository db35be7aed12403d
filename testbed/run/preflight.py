"""Checks a run passes before anything is built or started, each failure naming its field or file.

The controller checks here what would otherwise fail inside a node seconds later (or on a
Mininet network only): the model and its cut points, the data set and its files under
`data_root`, every link parameter of the topology (on loopback too, where none is applied), and
that `out_dir` can hold a run folder. It also picks free ports for a loopback run. Nothing here
starts a process or touches a network; the only thing it may create is `out_dir` itself.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from typing import Any

from testbed.errors import ConfigError
from testbed.plan.config import RunConfig
from testbed.run.records import RunDir


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_data(cfg: RunConfig) -> dict[str, Any]:
    """The data set exists and both its splits load from `data_root` (one sample each)."""
    from nodes.data import dataset_info, load_dataset

    try:
        info = dataset_info(cfg.data.dataset, cfg.data.root)
    except ValueError as e:
        raise ConfigError(f"config field 'data.dataset': {_one_line(e)}") from e
    for split in ("train", "test"):
        try:
            load_dataset(cfg.data.dataset, split, root=cfg.data.root, limit=1, seed=cfg.run.seed)
        except (OSError, ValueError, EOFError) as e:
            where = f" {cfg.data.root!r}" if cfg.data.root else ""
            raise ConfigError(f"config field 'data.root'{where}: data set {cfg.data.dataset!r} "
                              f"({split}): {_one_line(e)}") from e
    return info


def check_model(cfg: RunConfig, info: dict[str, Any]) -> None:
    """The model builds for the data set's shape and every cut names one of its units."""
    from nodes.models import build_model, split_model

    try:
        model = build_model(cfg.model.name, num_classes=info["num_classes"],
                            in_channels=info["in_channels"], image_size=info["image_size"])
    except ValueError as e:
        raise ConfigError(f"config field 'model.name': {_one_line(e)}") from e
    try:
        split_model(model, cfg.model.cuts)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config field 'model.cuts': {_one_line(e)}") from e


def check_links(topo: Any) -> None:
    """Every link parameter the topology declares parses (bw, delay, jitter, loss, queue)."""
    from testbed.emu.linkmodel import LinkParams
    from testbed.emu.links import shaping_params

    for a, b, info in topo.links(withInfo=True):
        try:
            LinkParams.from_mininet(**shaping_params(info))
        except (ValueError, TypeError) as e:
            raise ConfigError(f"topology link {a}-{b}: {_one_line(e)}") from e


def check_out_dir(out_dir: str) -> None:
    """`out_dir` is (or can become) a folder this process can create run folders in."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sledge-probe-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"config field 'run.out_dir' {out_dir!r}: {e.strerror or e}") from e


def make_run_dir(out_dir: str, name: str) -> RunDir:
    """A new run folder under `out_dir`; a folder that cannot be made is bad input."""
    check_out_dir(out_dir)
    try:
        return RunDir(out_dir, name)
    except OSError as e:
        raise ConfigError(f"config field 'run.out_dir' {out_dir!r}: {e.strerror or e}") from e


def preflight(cfg: RunConfig, topo: Any) -> None:
    """All checks that need no run folder, in the order a user would fix them."""
    check_model(cfg, check_data(cfg))
    check_links(topo)


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port_block(first: int, count: int) -> int:
    """The first port of `count` consecutive free TCP ports on 127.0.0.1, `first` itself when
    its block is free: loopback nodes all listen there, one port each (testbed.plan.runplan).
    Another
    process may still take a port before a node binds it; the node then fails naming it."""
    count = max(count, 1)
    base = first
    for _ in range(200):
        if base + count > 65535:
            base = 20000  # wrap to a range clear of the usual services
        if all(_free(p) for p in range(base, base + count)):
            return base
        base += count
    raise ConfigError(f"config field 'net.port': no {count} consecutive free ports on 127.0.0.1 "
                      f"from {first}")
