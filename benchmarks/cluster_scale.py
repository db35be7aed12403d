#!/usr/bin/env python3
"""How many hosts Mininet's cluster edition builds across two servers (mininet#1078 reports
it breaking past ~10 hosts): the tiny topology with N clients, every second client placed on
the other server (so N/2 GRE tunnels), built with testbed.emu.cluster.build_cluster.

Per N: build+start time, pings from srv (here) to every remote client (one each, loss
counted), counters read on both servers, stop time. Stops at the first N that fails and says
why. Needs a second machine as in tests/test_cluster_over_mininet.py (SLEDGE_CLUSTER_SERVER);
`scripts/vm.sh cluster -- .venv/bin/python benchmarks/cluster_scale.py` runs it in two guests.
It does not train (tests/test_cluster_over_mininet.py does) and writes one JSON line per N.

    sudo SLEDGE_CLUSTER_SERVER=10.213.7.2 .venv/bin/python benchmarks/cluster_scale.py \
        [--sizes 4,10,20,40]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from testbed.emu.capabilities import probe  # noqa: E402
from testbed.emu.cluster import build_cluster  # noqa: E402
from testbed.emu.topology import load_topology  # noqa: E402


def one(n: int, server: str) -> dict:
    topo, _ = load_topology(os.path.join(ROOT, "topologies", "tiny.py"), params={"clients": n})
    place = {f"c{i}": server for i in range(2, n + 1, 2)}
    t0 = time.perf_counter()
    net = build_cluster(topo, probe(), servers=["localhost", server], placer="switchbin",
                        place=place)
    out: dict = {"clients": n, "remote": len(place), "build_s": time.perf_counter() - t0}
    try:
        srv = net.net.get("srv")
        t1 = time.perf_counter()
        lost = 0
        for h in place:
            res = srv.cmd(f"ping -c1 -W5 {net.ip(h)}")
            if not re.search(r" 1 received", res):
                lost += 1
        out.update(ping_s=time.perf_counter() - t1, unreachable=lost)
        t2 = time.perf_counter()
        counters = net.counters()
        out.update(counters_s=time.perf_counter() - t2,
                   remote_counters=sum(f"{h}-eth0" in counters for h in place))
    finally:
        t3 = time.perf_counter()
        net.stop()
        out["stop_s"] = time.perf_counter() - t3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="4,10,20,40")
    ap.add_argument("--out", default=os.environ.get("SLEDGE_VM_OUT", "."))
    args = ap.parse_args()
    server = os.environ.get("SLEDGE_CLUSTER_SERVER")
    if not server:
        print("SLEDGE_CLUSTER_SERVER: the other server's address", file=sys.stderr)
        return 2
    path = os.path.join(args.out, "cluster_scale.jsonl")
    for n in (int(x) for x in args.sizes.split(",")):
        try:
            rec = one(n, server)
        except BaseException as e:  # noqa: BLE001 - the failure is the measurement
            rec = {"clients": n, "error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(rec), flush=True)
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if "error" in rec or rec.get("unreachable"):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
