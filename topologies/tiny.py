#!/usr/bin/env python3
"""Tiny topology: N clients and one edge server on one switch (the CI and default topology).

    c1 --\\
    c2 ---- s1 ---- srv
    ...       \\--- fed    (with fed=True: SplitFed's fed server, role "fedserver")

Each client link has its own bandwidth and delay; the server's link (and the fed server's) is
unshaped unless `server_bw` is given.
Run it through sledge (`sledge run topologies/tiny.py`) or on its own
(`sudo .venv/bin/python topologies/tiny.py --help`).
"""

from testbed.emu.topolib import Topo


class TinyTopo(Topo):
    def build(self, clients: int = 2, bw: float = 100, delay: str = "1ms",
              loss: float = 0, server_bw: float | None = None, server_delay: str = "0ms",
              fed: bool = False) -> None:
        s1 = self.addSwitch("s1")
        srv = self.addHost("srv", role="server")
        self.addLink(srv, s1, bw=server_bw, delay=server_delay)
        if fed:
            self.addLink(self.addHost("fed", role="fedserver"), s1, bw=server_bw,
                         delay=server_delay)
        for i in range(1, clients + 1):
            c = self.addHost(f"c{i}", role="client")
            self.addLink(c, s1, bw=bw, delay=delay, loss=loss)


TOPOS = {"tiny": TinyTopo}

if __name__ == "__main__":
    from testbed.cli.main import topology_main

    topology_main(__file__)
