"""The run configuration: every knob of an experiment, validated with errors that name the field.

A RunConfig is plain data (from CLI flags, a dict or YAML); the experiment resolves it against a
topology and stores the result in the run folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from testbed.errors import ConfigError


@dataclass
class RunConfig:
    name: str = "run"
    scheme: str = "psl"
    scheme_options: dict[str, Any] = field(default_factory=dict)
    rounds: int = 3
    iters_per_round: int | None = None  # None: one local epoch over the mean client shard
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    train_limit: int | None = 6000
    test_limit: int | None = 2000
    partition: str = "iid"
    alpha: float = 0.5
    model: str = "smallcnn"
    cuts: list[str] = field(default_factory=lambda: ["conv2"])
    # Roles of the relay tiers between the clients and the server, client side first (an
    # N-segment chain, docs/multitier.md), e.g. ["edge"]: needs len(tiers) + 1 cuts or more.
    tiers: list[str] = field(default_factory=list)
    # host -> role, overriding the topology's role= tag (e.g. a platoon's vehicles as relays).
    roles: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    out_dir: str = "runs"
    port: int = 5555
    step_timeout_s: float = 300.0
    start_timeout_s: float = 180.0
    round_timeout_s: float = 3600.0
    evaluate: bool = True
    launcher: str = "popen"       # "popen": an interpreter per node; "zygote": forked, warm
    link_backend: str = "auto"    # "auto": netem where the kernel has it, else "relay"
    linkcheck: bool = False       # measure every path before training, store linkcheck.json
    scenario: str | None = None   # a scenario timeline, YAML (testbed.scenario.timeline)
    # Controller routes on Mininet networks (testbed.emu.routing): between the scheme's
    # (dealer, router) pairs, between all hosts, or none (the topology's L2 reachability).
    routes: str = "scheme"
    route_metric: str = "widest"  # "widest" (bottleneck capacity) or "shortest" (delay)
    # Device heterogeneity. Keys are host names or roles (a host's own entry wins); they override
    # what the topology declares on its hosts (addHost(..., cpu=, mem_mb=, cycles=)).
    cpu: dict[str, float] = field(default_factory=dict)     # fraction of the whole machine
    mem_mb: dict[str, int] = field(default_factory=dict)    # memory limit, MiB
    cycles: dict[str, float] = field(default_factory=dict)  # modelled compute speed, cycles/s
    flops_per_cycle: float = 1.0        # eta (algorithms.md 11.2)
    backward_flops_factor: float = 2.0  # beta: backward FLOPs per forward FLOP (11.1)
    # Resource efficiency (docs/compression.md): the cut codec of every node, e.g.
    # {"method": "c3sl", "R": 4} | {"method": "topk", "rho": 0.1} | {"method": "quant",
    # "bits": 8}; low-precision or pruned client weights per host or role, e.g.
    # {"client": {"bits": 8}} or {"c1": {"prune": 0.5}}; client selection per round, e.g.
    # {"policy": "rpowd", "m": 2, "d": 3, "deadline_s": 2.0} (nodes.selection).
    compression: dict[str, Any] = field(default_factory=dict)
    client_weights: dict[str, dict] = field(default_factory=dict)
    selection: dict[str, Any] = field(default_factory=dict)
    # Fault tolerance (docs/fault-tolerance.md): beat period, beats missed before a node is
    # declared dead, and how many node restarts a run may use (0: any death fails the run).
    heartbeat_s: float = 0.5
    heartbeat_misses: int = 10
    max_restarts: int = 3
    # Security and bounds (docs/security.md): every socket uses CURVE with keys made for the run
    # unless `insecure`; each node refuses frames above max_message_bytes and connections past
    # max_connections per listening socket (0: derived from the run's largest expected message
    # and its number of processes).
    insecure: bool = False
    max_message_bytes: int = 0
    max_connections: int = 0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"config: unknown field(s) {unknown}; valid: {sorted(known)}")
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        def need(cond: bool, fld: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"config field {fld!r}: {what}, got {getattr(self, fld)!r}")

        def pos_int(fld: str, allow_none: bool = False) -> None:
            v = getattr(self, fld)
            ok = (v is None and allow_none) or (isinstance(v, int) and not isinstance(v, bool)
                                                and v > 0)
            need(ok, fld, "expected a positive integer" + (" or null" if allow_none else ""))

        for f in ("rounds", "batch_size", "port"):
            pos_int(f)
        for f in ("iters_per_round", "train_limit", "test_limit"):
            pos_int(f, allow_none=True)
        need(isinstance(self.lr, (int, float)) and self.lr > 0, "lr", "expected a number > 0")
        need(isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1, "momentum",
             "expected a number in [0, 1)")
        need(self.partition in ("iid", "dirichlet"), "partition", "expected 'iid' or 'dirichlet'")
        need(isinstance(self.alpha, (int, float)) and self.alpha > 0, "alpha",
             "expected a number > 0")
        need(isinstance(self.cuts, list) and len(self.cuts) >= 1
             and all(isinstance(c, str) for c in self.cuts), "cuts",
             "expected a non-empty list of cut-point names")
        need(isinstance(self.tiers, list) and all(
            isinstance(t, str) and t not in ("client", "server") for t in self.tiers)
             and len(set(self.tiers)) == len(self.tiers), "tiers",
             "expected a list of distinct role names other than 'client' and 'server'")
        need(len(self.cuts) > len(self.tiers), "cuts",
             f"expected more cut points than relay tiers ({len(self.tiers)})")
        need(isinstance(self.roles, dict) and all(
            isinstance(k, str) and isinstance(v, str) and v for k, v in self.roles.items()),
             "roles", "expected a mapping host -> role name")
        need(isinstance(self.scheme_options, dict), "scheme_options", "expected a mapping")
        need(self.port < 65536, "port", "expected a TCP port")
        need(self.launcher in ("popen", "zygote"), "launcher", "expected 'popen' or 'zygote'")
        need(self.scenario is None or (isinstance(self.scenario, str) and bool(self.scenario)),
             "scenario", "expected the path of a scenario YAML file or null")
        need(self.link_backend in ("auto", "netem", "relay"), "link_backend",
             "expected 'auto', 'netem' or 'relay'")
        need(self.routes in ("scheme", "all", "off"), "routes",
             "expected 'scheme', 'all' or 'off'")
        need(self.route_metric in ("widest", "shortest"), "route_metric",
             "expected 'widest' or 'shortest'")
        for f in ("step_timeout_s", "start_timeout_s", "round_timeout_s"):
            need(isinstance(getattr(self, f), (int, float)) and getattr(self, f) > 0, f,
                 "expected a number of seconds > 0")
        for f, ok, what in (("cpu", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
                            ("mem_mb", lambda v: isinstance(v, int) and v > 0,
                             "a whole number of MiB > 0"),
                            ("cycles", lambda v: v > 0, "cycles/s > 0")):
            m = getattr(self, f)
            need(isinstance(m, dict) and all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                and ok(v) for k, v in m.items()), f, f"expected a mapping host or role -> {what}")
        pos_int("heartbeat_misses")
        for f in ("compression", "selection"):
            need(isinstance(getattr(self, f), dict), f, "expected a mapping")
        if self.compression:
            from nodes.compression import CompressionError, make_codec
            try:
                make_codec(self.compression)
            except CompressionError as e:
                raise ConfigError(str(e)) from None
        need(isinstance(self.client_weights, dict) and all(
            isinstance(v, dict) and set(v) <= {"bits", "prune"}
            for v in self.client_weights.values()), "client_weights",
             "expected a mapping host or role -> {bits: int, prune: fraction}")
        for f in ("max_restarts", "max_message_bytes", "max_connections"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f,
                 "expected an integer >= 0")
        for f in ("flops_per_cycle", "backward_flops_factor", "heartbeat_s"):
            need(isinstance(getattr(self, f), (int, float)) and getattr(self, f) > 0, f,
                 "expected a number > 0")
        need(isinstance(self.name, str) and self.name.replace("-", "").replace("_", "").isalnum(),
             "name", "expected letters, digits, '-' or '_'")
