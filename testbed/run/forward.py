"""The control forwarder: a node on another machine reaches the controller as if it were local.

A node dials the controller at an ipc:// path (a Unix stream socket). On a remote server this
process listens at that path and pipes each connection's bytes, unchanged and both ways, to
the controller's TCP control endpoint (the run's `cluster.control`), one TCP connection per
accepted one. ZMTP, the CURVE handshake included, is the same over ipc and tcp, so the node
keeps its config and authentication stays end to end: the controller's ROUTER and its ZAP
gatekeeper see the node's own key, and the forwarder holds no key, so it can neither read nor
forge a message. An ipc path is a file, so it also crosses network namespaces: a node inside
a Mininet host reaches it without a route, and control traffic stays off the emulated links.

It does not start nodes, read messages, retry or buffer: when the controller cannot be
reached it closes the node's connection, and the node's ZeroMQ socket dials again.

    python -m testbed.run.forward --listen /tmp/sledge-ctl-XXXX/remote --to 10.0.0.1:7000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys

CHUNK = 1 << 16  # bytes read at a time: a pipe, not a buffer; ZeroMQ frames its own messages


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or an error on either side, then close the writing side: one end gone
    ends the connection (ZMTP has no half-open state worth keeping)."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()  # back-pressure: never read faster than the far side takes
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _split(to: str) -> tuple[str, int]:
    host, sep, port = to.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--to: expected <host>:<port>, got {to!r}")
    return host, int(port)


async def serve(listen: str, to: str, ready: asyncio.Event | None = None,
                stop: asyncio.Event | None = None) -> None:
    """Forward connections on the Unix socket `listen` to `to` ("host:port") until `stop`.
    `listen`'s folder is made (owner only) if missing: on a remote server the path is the
    controller's, which exists nowhere else."""
    host, port = _split(to)
    folder = os.path.dirname(listen)
    if folder:
        os.makedirs(folder, mode=0o700, exist_ok=True)

    async def connection(node_r: asyncio.StreamReader, node_w: asyncio.StreamWriter) -> None:
        try:  # asyncio turns TCP_NODELAY on: a small control message leaves at once
            ctl_r, ctl_w = await asyncio.open_connection(host, port)
        except OSError:
            node_w.close()  # the node's ZeroMQ reconnects and we try again then
            return
        await asyncio.gather(_pipe(node_r, ctl_w), _pipe(ctl_r, node_w))

    # A stale socket file (a forwarder that was killed) is replaced by asyncio itself.
    server = await asyncio.start_unix_server(connection, path=listen)
    try:
        os.chmod(listen, 0o600)  # the nodes run as we do; nobody else needs to dial in
        if ready is not None:
            ready.set()
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(listen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m testbed.run.forward", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", required=True,
                    help="the Unix socket path the nodes dial (their config's control "
                         "address without ipc://)")
    ap.add_argument("--to", required=True, help="the controller's TCP control endpoint, "
                                                "<host>:<port> (its cluster.control)")
    args = ap.parse_args(argv)
    listen = args.listen.removeprefix("ipc://")
    try:
        _split(args.to)
    except ValueError as e:
        ap.error(str(e))

    async def run() -> None:
        stop, ready = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # leave no socket file behind
            loop.add_signal_handler(sig, stop.set)
        task = asyncio.create_task(serve(listen, args.to, ready, stop))
        await asyncio.wait([task, asyncio.create_task(ready.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():  # who started us (a test, ssh) may wait for this line
            print(f"forwarding {listen} -> {args.to}", flush=True)
        await task

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
