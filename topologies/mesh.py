#!/usr/bin/env python3
"""Mesh topology: edge servers meshed with each other, clients attached to some of them.

    layout="grid" (rows x cols)            layout="geometric" (seeded random geometric graph)

    c1 -- m1 --- m2 --- m3                 n edge servers at random points of the unit square,
          |      |      |                  linked when closer than `radius`
    c2 -- m4 --- m5 --- m6 (server)

The edge servers (m<i>, role "edge", the one named by `server` role "server", tier "edge") are
routers: a mesh bridged at L2 would loop, so every host keeps one address and the central
controller (testbed.emu.routing) installs host routes hop by hop; until it does, only directly
linked hosts reach each other. By default the clients (c<j>, role "client") attach round-robin
to the `clients` westernmost edge servers and the easternmost one is the server; `attach` (edge
server names) and `server` choose otherwise. Each edge server is tagged with its position
(`pos`), e.g. for mobility. `links` ("mesh", "access") and `resources` are data as in
topologies/cellular.py. Routing and addressing: docs/topologies.md.
"""


import networkx as nx

from testbed.emu.topolib import Topo, link_kwargs, load

LINKS = {"mesh": "mesh", "access": "cellular"}  # link class -> default preset


def mesh_graph(layout: str, rows: int, cols: int, n: int, radius: float,
               seed: int) -> nx.Graph:
    """Edge servers m1.. with a `pos` (x, y) each, linked as the layout says; connected."""
    if layout == "grid":
        g = nx.Graph()
        for r in range(rows):
            for c in range(cols):
                i = r * cols + c + 1
                g.add_node(f"m{i}", pos=(float(c), float(r)))
                if c:
                    g.add_edge(f"m{i - 1}", f"m{i}")
                if r:
                    g.add_edge(f"m{i - cols}", f"m{i}")
    elif layout == "geometric":
        rgg = nx.random_geometric_graph(n, radius, seed=seed)
        g = nx.relabel_nodes(rgg, {i: f"m{i + 1}" for i in rgg})
        nx.set_node_attributes(g, {v: tuple(p) for v, p in g.nodes(data="pos")}, "pos")
    else:
        raise ValueError(f"layout {layout!r}: valid: 'grid', 'geometric'")
    if not g or not nx.is_connected(g):
        raise ValueError(f"mesh {layout} (n={len(g)}, radius={radius}, seed={seed}) is not "
                         "connected: raise the radius or change the seed")
    return g


class MeshTopo(Topo):
    def build(self, layout: str = "grid", rows: int = 2, cols: int = 3, n: int = 6,
              radius: float = 0.6, seed: int = 1, clients: int = 2,
              attach: list[str] | None = None, server: str | None = None,
              links: dict | str | None = None, resources: dict | str | None = None) -> None:
        kw, res = link_kwargs(links, LINKS), load(resources)
        g = mesh_graph(layout, rows, cols, n, radius, seed)
        west_to_east = sorted(g, key=lambda v: (*g.nodes[v]["pos"], int(v[1:])))
        server = server or west_to_east[-1]
        attach = attach or west_to_east[:max(1, min(clients, len(g) - 1))]
        if unknown := sorted({server, *attach} - set(g)):
            raise ValueError(f"mesh: no edge server(s) {unknown}; have {sorted(g)}")

        def host(name: str, role: str, **tags: object) -> str:
            return self.addHost(name, role=role, **{**tags, **res.get(role, {})})

        for v in sorted(g, key=lambda v: int(v[1:])):
            host(v, "server" if v == server else "edge", tier="edge", router=True,
                 pos=g.nodes[v]["pos"])
        for a, b in sorted(g.edges, key=lambda e: (int(e[0][1:]), int(e[1][1:]))):
            self.addLink(a, b, **kw["mesh"])
        for j in range(1, clients + 1):
            self.addLink(host(f"c{j}", "client", tier="user"), attach[(j - 1) % len(attach)],
                         **kw["access"])


TOPOS = {"mesh": MeshTopo}

if __name__ == "__main__":
    from testbed.cli.main import topology_main

    topology_main(__file__)
