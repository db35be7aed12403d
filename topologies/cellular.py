#!/usr/bin/env python3
"""Cellular topology: cells of UEs sharing their cell's radio capacity, backhaul to an edge server.

    ue1 --\\
    ue2 ---- cell1 ==cell== bs1 --backhaul--\\
    ue3 --/                                  agg1 ---- srv   (and fed, with fed=True)
    ue4 ---- cell2 ==cell== bs2 --backhaul--/
    ...

A cell is a bridge (cell<i>) its UEs attach to with unshaped links, joined to its base station
(bs<i>) by ONE shaped link with the cell's asymmetric capacity: the UEs of a cell share it as
they share a real cell's uplink and downlink. Base stations reach the edge site's switch (agg1)
over backhaul links; the edge server (role "server") sits on it. The whole network is one L2
tree, so no routing is needed. The default, one cell of 3 UEs, is the schemes comparison
topology.

With `edges="per-cell"` every base station has its own edge server e<c> beside it (an
unshaped link: the edge site is at the base station) instead of the one srv behind agg1; the
edge of cell `serving` plays role "server", the others "standby" (no process until the model
migrates there, docs/migration.md). Edge to edge, state crosses two shaped backhaul links
(bs<i> - agg1 - bs<j>):

    ue1 -- cell1 ==cell== bs1 -- e1 (server)
                           | backhaul
                          agg1
                           | backhaul
    ue2 -- cell2 ==cell== bs2 -- e2 (standby)

Link parameters are data: `links` maps a link class ("cell", "backhaul") to Mininet link keys
overriding its preset (testbed.emu.linkmodel.PRESETS), or to {"preset": name, ...}; a dict or a YAML
file. `resources` maps a role to host parameters (e.g. {"client": {"cpu": 0.2, "mem_mb": 512}}).
Base station bs<c> is tagged with its cell, its position ((c - 1) * spacing, 0) in metres and
the node its radio link starts from (cell<c>): scenarios move UEs against them
(testbed.plan.mobility, docs/scenarios.md).

    sledge run topologies/cellular.py -p ues=5 -p "links={'cell': {'bw_up': 20}}"
"""


from testbed.emu.topolib import Topo, link_kwargs, load

EDGES = ("shared", "per-cell")
LINKS = {"cell": "cellular", "backhaul": "wireless-backhaul"}  # link class -> default preset


class CellularTopo(Topo):
    def build(self, cells: int = 1, ues: int = 3, links: dict | str | None = None,
              resources: dict | str | None = None, fed: bool = False,
              edges: str = "shared", serving: int = 1, spacing: float = 1000.0) -> None:
        if edges not in EDGES:
            raise ValueError(f"edges={edges!r}: valid: {list(EDGES)}")
        if edges == "per-cell" and not 1 <= serving <= cells:
            raise ValueError(f"serving={serving}: expected a cell in 1..{cells}")
        kw, res = link_kwargs(links, LINKS), load(resources)

        def host(name: str, role: str, **tags: object) -> str:
            # A standby edge may become the server: it gets the server's resources.
            own = res.get(role, res.get("server", {}) if role == "standby" else {})
            return self.addHost(name, role=role, **{**tags, **own})

        dpid = iter(range(1, 1 << 16))  # unique datapath ids for Open vSwitch
        agg = self.addSwitch("agg1", dpid=f"{next(dpid):x}")
        if edges == "shared":
            self.addLink(host("srv", "server", tier="edge"), agg)
        if fed:
            self.addLink(host("fed", "fedserver", tier="edge"), agg)
        n = 0
        for c in range(1, cells + 1):
            cell = self.addSwitch(f"cell{c}", dpid=f"{next(dpid):x}")
            # Base stations on a line, `spacing` metres apart (testbed.plan.mobility reads the
            # tags).
            bs = self.addSwitch(f"bs{c}", dpid=f"{next(dpid):x}", bs=True, cell=c,
                                pos=((c - 1) * spacing, 0.0), access=f"cell{c}")
            self.addLink(cell, bs, **kw["cell"])  # node1 = the UE side: "up" is the uplink
            self.addLink(bs, agg, **kw["backhaul"])
            if edges == "per-cell":
                role = "server" if c == serving else "standby"
                self.addLink(host(f"e{c}", role, tier="edge", cell=c), bs)
            for _ in range(ues):
                n += 1
                self.addLink(host(f"ue{n}", "client", tier="user", cell=c), cell)


TOPOS = {"cellular": CellularTopo}

if __name__ == "__main__":
    from testbed.cli.main import topology_main

    topology_main(__file__)
