#!/usr/bin/env python3
"""Platoon topology: vehicles in a chain of V2V links, and an edge server behind the cell.

    v4 --v2v-- v3 --v2v-- v2 --v2v-- v1 ---- cell1 ==cell== srv
                                              (v2i="all": every vehicle on cell1)

Vehicles (v<i>, role "client", tier "user", v1 leads) relay for each other over V2V links
(preset "v2v"; {"v2v": "d2d"} in `links` makes it a D2D sidelink chain). With v2i="lead" only
the lead vehicle reaches the cell and the others' traffic hops along the platoon; with
v2i="all" each vehicle also attaches to the cell, whose ONE shaped link (preset "cellular") all
attached vehicles share, and the controller picks between the cell and the chain. Vehicles are
routers; the controller (testbed.emu.routing) installs the routes. The edge server (srv, role
"server") sits at the base station. `links` ("v2v", "cell") and `resources` are data as in
topologies/cellular.py.
"""


from testbed.emu.topolib import Topo, link_kwargs, load

LINKS = {"v2v": "v2v", "cell": "cellular"}  # link class -> default preset


class PlatoonTopo(Topo):
    def build(self, vehicles: int = 4, v2i: str = "lead", links: dict | str | None = None,
              resources: dict | str | None = None) -> None:
        if v2i not in ("lead", "all"):
            raise ValueError(f"v2i={v2i!r}: valid: 'lead', 'all'")
        kw, res = link_kwargs(links, LINKS), load(resources)

        def host(name: str, role: str, **tags: object) -> str:
            return self.addHost(name, role=role, **{**tags, **res.get(role, {})})

        cell = self.addSwitch("cell1")
        self.addLink(cell, host("srv", "server", tier="edge"), **kw["cell"])  # up = uplink
        for i in range(1, vehicles + 1):
            v = host(f"v{i}", "client", tier="user", router=True, platoon_index=i)
            if i > 1:
                self.addLink(f"v{i - 1}", v, **kw["v2v"])
            if i == 1 or v2i == "all":
                self.addLink(v, cell)


TOPOS = {"platoon": PlatoonTopo}

if __name__ == "__main__":
    from testbed.cli.main import topology_main

    topology_main(__file__)
