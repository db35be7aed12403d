#!/usr/bin/env python3
"""Hierarchical topology: users -> edge -> cloud, the three tiers of hierarchical split learning.

    u1 --access--\\
    u2 --access--- es1 ---- edge1
    ...             \\
                     ==edge_cloud== cs1 ---- cloud
    u6 --access--- es2 ---- edge2  //
    ...             \\==edge_cloud==//

Each user has its own access link to its edge site (es<e>), where the edge server sits; each edge
site reaches the cloud site (cs1) over one edge-cloud link. Users talk to the cloud across both
their access link and the edge-cloud link, as the user-cloud baseline needs; the network is one
L2 tree, so no routing is needed.

Seed paper Fig. 6 (algorithms.md 11.7, 12): the edge-cloud capacity is `cec_ratio` (1/20) of the
user-edge capacity, per direction: of the aggregate of that edge's users' access rates
(`cec_mode="aggregate"`, the default) or of one user's (`"per_user"`); a `bw` given for the
"edge_cloud" class in `links` wins. Compute is tagged as data (`gcycles`, 1e9 cycles/s): users
0.1 ... 0.5, edge 7, cloud 20.

Roles: users are "client"; the cloud is "server" and edges "edge" (server="cloud"), or with one
edge and server="edge" the edge is "server" and the cloud "cloud". `tier` is always user, edge or
cloud. With fed=True a fed server (role "fedserver", SplitFed's) sits at the cloud site.
`links` and `resources` are data as in topologies/cellular.py.
"""


from testbed.emu.linkmodel import LinkParams
from testbed.emu.topolib import Topo, link_kwargs, load

LINKS = {"access": "cellular", "edge_cloud": "wired-backhaul"}  # link class -> default preset
USER_GCYCLES = (0.1, 0.2, 0.3, 0.4, 0.5)  # seed Fig. 4/6 clients, U[0.1, 0.5] made deterministic


def edge_cloud_kwargs(kw: dict, users: int, ratio: float, mode: str) -> dict:
    """The edge-cloud link: its class's kwargs, with each direction's rate `ratio` of the users'
    access rate in that direction (the aggregate of `users`, or one user's)."""
    if mode not in ("aggregate", "per_user"):
        raise ValueError(f"cec_mode {mode!r}: valid: 'aggregate', 'per_user'")
    ec = {k: v for k, v in kw["edge_cloud"].items() if k.partition("_")[0] != "bw"}
    access = LinkParams.from_mininet(**kw["access"])
    n = users if mode == "aggregate" else 1
    for side, d in (("up", access.up), ("down", access.down)):
        if d.bw_mbit is not None:
            ec[f"bw_{side}"] = ratio * n * d.bw_mbit
    return ec


class HierarchicalTopo(Topo):
    def build(self, users: int = 5, edges: int = 1, cec_ratio: float = 1 / 20,
              cec_mode: str = "aggregate", server: str = "cloud",
              links: dict | str | None = None, resources: dict | str | None = None,
              fed: bool = False) -> None:
        if server not in ("cloud", "edge") or (server == "edge" and edges != 1):
            raise ValueError(f"server={server!r}: 'cloud', or 'edge' with exactly one edge")
        given, res = load(links), load(resources)
        kw = link_kwargs(given, LINKS)
        over = given.get("edge_cloud") or {}
        rate_given = isinstance(over, dict) and any(k.partition("_")[0] == "bw" for k in over)
        ec = kw["edge_cloud"] if rate_given else edge_cloud_kwargs(kw, users, cec_ratio, cec_mode)
        roles = {"edge": "server" if server == "edge" else "edge",
                 "cloud": "server" if server == "cloud" else "cloud"}

        def host(name: str, tier: str, role: str, gcycles: float) -> str:
            return self.addHost(name, role=role, tier=tier,
                                **{"gcycles": gcycles, **res.get(role, {})})

        dpid = iter(range(1, 1 << 16))  # unique datapath ids for Open vSwitch
        cs = self.addSwitch("cs1", dpid=f"{next(dpid):x}")
        self.addLink(host("cloud", "cloud", roles["cloud"], 20.0), cs)
        if fed:
            self.addLink(host("fed", "cloud", "fedserver", 20.0), cs)
        n = 0
        for e in range(1, edges + 1):
            es = self.addSwitch(f"es{e}", dpid=f"{next(dpid):x}")
            self.addLink(host(f"edge{e}", "edge", roles["edge"], 7.0), es)
            self.addLink(es, cs, **ec)  # node1 = the edge: "up" is towards the cloud
            for _ in range(users):
                n += 1
                u = host(f"u{n}", "user", "client", USER_GCYCLES[(n - 1) % len(USER_GCYCLES)])
                self.addLink(u, es, **kw["access"])


TOPOS = {"hierarchical": HierarchicalTopo}

if __name__ == "__main__":
    from testbed.cli.main import topology_main

    topology_main(__file__)
