"""A run's configuration as data: nested typed sections, validated, errors naming the dotted field.

`RunConfig` holds everything a run needs besides its topology: run, scheme, train, data,
model, net, devices, efficiency, fault, timeouts, security, fidelity, transport and cluster. The
sections a node reads as they are (train, timeouts, fault, transport) are nodes.settings'
models, shared with the node configs, so no default is written twice. A config comes from an
experiment file (YAML, nested), from command-line flags, or from Python; flat keys are accepted
as shorthand for the field they name (`rounds=2` is `run.rounds`, `scheme="epsl"` is
`scheme.name`: `FLAT`). `to_dict()` is the nested form, which `from_dict` reads back unchanged.
Checks that need the topology, the model or the data set are testbed.run.preflight's; this
module only knows the values.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from nodes.imports import absolute, is_reference
from nodes.settings import Fault, Section, Timeouts, Train, Transport
from testbed.errors import ConfigError

Positive = Annotated[float, Field(gt=0)]


class Run(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9_-]+$",
                      description="the run folder's suffix: letters, digits, '-' or '_'")
    seed: int = Field(0, description="seeds data order, partitions and weights")
    rounds: int = Field(3, gt=0)
    out_dir: str = Field("runs", description="where run folders go")
    evaluate: bool = Field(True, description="test accuracy after every round")
    launcher: Literal["popen", "zygote"] = Field(
        "zygote", description="zygote: forked from a warm process; popen: an interpreter per node")
    scenario: str | None = Field(None, min_length=1, description="a scenario timeline (YAML)")


def _own_code(v: str) -> str:
    """A reference to the user's code (file.py:attr) made absolute: nodes may run elsewhere."""
    return absolute(v) if is_reference(v) else v


class SchemeSpec(Section):
    name: str = Field("psl", description="a scheme of nodes.schemes (sledge list schemes) or "
                                         "your own: pkg.module:MyScheme")
    options: dict[str, Any] = Field(default_factory=dict, description="the scheme's options")

    _own = field_validator("name")(classmethod(lambda cls, v: _own_code(v)))


class Data(Section):
    dataset: str = Field("fashion-mnist", description="a built-in (sledge list datasets) or "
                                                     "your own: pkg.module:load")
    root: str | None = Field(None, description="folder of a data set's files (mnist, cifar10...)")
    train_limit: int | None = Field(6000, gt=0, description="training samples (null: all)")
    test_limit: int | None = Field(2000, gt=0, description="test samples (null: all)")
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (non-IID)")

    _own = field_validator("dataset")(classmethod(lambda cls, v: _own_code(v)))


class Model(Section):
    name: str = Field("smallcnn", description="a built-in (sledge list models) or your own "
                                             "nn.Module factory: pkg.module:build")
    cuts: list[str] = Field(default_factory=lambda: ["conv2"], min_length=1,
                            description="cut points, client side first")

    _own = field_validator("name")(classmethod(lambda cls, v: _own_code(v)))


class Net(Section):
    port: int = Field(5555, gt=0, lt=65536, description="first data-plane port")
    link_backend: Literal["auto", "netem", "relay"] = Field(
        "auto", description="auto: netem where the kernel has it, else the user-space relay")
    linkcheck: bool = Field(False, description="measure every path before training")
    # Controller routes on Mininet networks (testbed.emu.routing): between the scheme's
    # (dealer, router) pairs, between all hosts, or none (the topology's L2 reachability).
    routes: Literal["scheme", "all", "off"] = "scheme"
    route_metric: Literal["widest", "shortest"] = "widest"
    # host -> role, overriding the topology's role= tag (e.g. a platoon's vehicles as relays).
    roles: dict[str, Annotated[str, Field(min_length=1)]] = Field(default_factory=dict)
    # Roles of the relay tiers between the clients and the server, client side first (an
    # N-segment chain, docs/multitier.md), e.g. ["edge"]: needs len(tiers) + 1 cuts or more.
    tiers: list[str] = Field(default_factory=list)

    @field_validator("tiers")
    @classmethod
    def _distinct_relay_roles(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v) or {"client", "server"} & set(v):
            raise ValueError("expected distinct role names other than 'client' and 'server'")
        return v


class ClientWeights(Section):
    bits: int | None = Field(None, gt=0, le=32)
    prune: float | None = Field(None, ge=0, lt=1)


class Devices(Section):
    """Device heterogeneity. Keys are host names or roles (a host's own entry wins); they
    override what the topology declares on its hosts (addHost(..., cpu=, mem_mb=, cycles=))."""

    cpu: dict[str, Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=dict, description="share of the whole machine (cgroup quota)")
    mem_mb: dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict, description="memory limit, MiB")
    cycles: dict[str, Positive] = Field(default_factory=dict,
                                        description="modelled compute speed, cycles/s")
    flops_per_cycle: float = Field(1.0, gt=0, description="eta (docs/latency.md)")
    backward_flops_factor: float = Field(2.0, gt=0,
                                         description="beta: backward FLOPs per forward FLOP")
    client_weights: dict[str, ClientWeights] = Field(
        default_factory=dict, description="low-precision or pruned client weights")
    # Unset, a node runs 1 torch thread: a kernel's summation order depends on the thread
    # count, so only then are results bit for bit the same on every machine.
    threads: dict[str, Annotated[int, Field(gt=0)]] = Field(
        default_factory=dict, description="torch threads of a node (unset: 1), e.g. "
                                          "{server: 2} while clients wait on it")


class Efficiency(Section):
    """Resource efficiency (docs/compression.md): the cut codec of every node, e.g.
    {method: c3sl, R: 4}; client selection per round, e.g. {policy: rpowd, m: 2, d: 3}."""

    compression: dict[str, Any] = Field(default_factory=dict)
    selection: dict[str, Any] = Field(default_factory=dict)

    @field_validator("compression")
    @classmethod
    def _codec_exists(cls, v: dict[str, Any]) -> dict[str, Any]:
        if v:
            from nodes.compression import CompressionError, make_codec

            try:
                make_codec(v)
            except CompressionError as e:
                raise ValueError(str(e)) from None
        return v


class Security(Section):
    """docs/security.md: CURVE with keys made per run unless `insecure`; frames above
    max_message_bytes and connections past max_connections per listening socket are refused
    (0: derived from the run's largest expected message and its number of processes)."""

    insecure: bool = False
    max_message_bytes: int = Field(0, ge=0)
    max_connections: int = Field(0, ge=0)


class Fidelity(Section):
    """When a round's numbers are not to be trusted (testbed.run.fidelity,
    docs/link-emulation.md): Mininet-HiFi's 35 % idle CPU every second, and relay lateness
    against the link's own delay."""

    monitor: bool = Field(True, description="measure and judge every round")
    min_idle: float = Field(0.35, ge=0, le=1, description="least idle CPU share in any second")
    lateness_fraction: float = Field(
        0.1, gt=0, description="p99 relay lateness allowed, as a share of the link's delay")
    lateness_floor_ms: float = Field(0.5, ge=0, description="lateness always allowed (ms)")


class Cluster(Section):
    """Nodes on other machines (docs/cluster.md). Their control connection reaches the
    controller through a forwarder on their machine (testbed.run.forward) and this TCP
    endpoint, CURVE end to end; their checkpoints come back with their round reports."""

    control: str = Field("", pattern=r"^$|^[^:\s]+:\d{1,5}$",
                         description="<ip>:<port> the control socket binds on too, for the "
                                     "forwarders (port 0: any free one); empty: local only")
    remote: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="hosts whose node runs on another machine (with "
                                          "servers: those placed on another server are added)")
    servers: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Mininet cluster edition servers (name or IP, "
                                          "'localhost' for this one); empty: one machine")
    placer: Literal["switchbin", "hostswitchbin", "roundrobin", "random"] = Field(
        "switchbin", description="Mininet's placer for nodes that `place` does not name")
    place: dict[str, Annotated[str, Field(min_length=1)]] = Field(
        default_factory=dict, description="node -> server, over the placer's choice")

    @model_validator(mode="after")
    def _remote_needs_control(self) -> Cluster:
        if (self.remote or self.servers) and not self.control:
            raise ValueError("remote hosts need a TCP control endpoint in cluster.control, "
                             "e.g. 10.0.0.1:7000")
        if unknown := sorted(set(self.place.values()) - set(self.servers)):
            raise ValueError(f"cluster.place names server(s) {unknown} not in cluster.servers "
                             f"{self.servers}")
        return self


SECTIONS = ("run", "scheme", "train", "data", "model", "net", "devices", "efficiency", "fault",
            "timeouts", "security", "fidelity", "transport", "cluster")

# Flat shorthand -> the dotted field it names (the command line's and the old flat names).
FLAT: dict[str, str] = {
    **{k: f"run.{k}" for k in ("name", "seed", "rounds", "out_dir", "evaluate", "launcher",
                               "scenario")},
    "scheme": "scheme.name", "scheme_options": "scheme.options",
    **{k: f"train.{k}" for k in ("batch_size", "lr", "momentum", "iters_per_round")},
    "dataset": "data.dataset", "data_root": "data.root",
    **{k: f"data.{k}" for k in ("train_limit", "test_limit", "partition", "alpha")},
    "model": "model.name", "cuts": "model.cuts",
    **{k: f"net.{k}" for k in ("port", "link_backend", "linkcheck", "routes", "route_metric",
                               "roles", "tiers")},
    **{k: f"devices.{k}" for k in ("cpu", "mem_mb", "cycles", "flops_per_cycle",
                                   "backward_flops_factor", "client_weights", "threads")},
    "compression": "efficiency.compression", "selection": "efficiency.selection",
    **{k: f"fault.{k}" for k in ("heartbeat_s", "heartbeat_misses", "max_restarts")},
    "step_timeout_s": "timeouts.step_s", "start_timeout_s": "timeouts.start_s",
    "round_timeout_s": "timeouts.round_s",
    **{k: f"security.{k}" for k in ("insecure", "max_message_bytes", "max_connections")},
    "reuse_receive_memory": "transport.reuse_receive_memory",
}


def dotted(key: str, value: Any = None) -> str:
    """The dotted path a key names: a section's own field (`train.lr`), or a flat name and
    what follows it (`lr`, `cycles.client` -> `devices.cycles.client`). "scheme" and "model"
    are sections and flat names for their `name`: a string value is a name."""
    head, _, rest = key.partition(".")
    if head in SECTIONS and (rest or isinstance(value, dict) or head not in FLAT):
        return key
    return FLAT[head] + (f".{rest}" if rest else "") if head in FLAT else key


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`, mappings merged key by key (a later value wins)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def nest(d: dict[str, Any]) -> dict[str, Any]:
    """Flat shorthand and dotted keys (`train.lr`) into the nested form; sections as given."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        *parents, leaf = dotted(key, value).split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config field {p!r}: expected a section (a mapping)")
        node[leaf] = merge(node[leaf], value) if isinstance(value, dict) and isinstance(
            node.get(leaf), dict) else value
    return out


class RunConfig(BaseModel):
    model_config = Section.model_config

    run: Run = Field(default_factory=Run)
    scheme: SchemeSpec = Field(default_factory=SchemeSpec)
    train: Train = Field(default_factory=Train)
    data: Data = Field(default_factory=Data)
    model: Model = Field(default_factory=Model)
    net: Net = Field(default_factory=Net)
    devices: Devices = Field(default_factory=Devices)
    efficiency: Efficiency = Field(default_factory=Efficiency)
    fault: Fault = Field(default_factory=Fault)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    security: Security = Field(default_factory=Security)
    fidelity: Fidelity = Field(default_factory=Fidelity)
    transport: Transport = Field(default_factory=Transport)
    cluster: Cluster = Field(default_factory=Cluster)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**nest(data))
        except ValidationError as e:
            raise ConfigError(describe(e)) from None

    @model_validator(mode="after")
    def _more_cuts_than_tiers(self) -> RunConfig:
        if len(self.model.cuts) <= len(self.net.tiers):
            raise ValueError(f"model.cuts: expected more cut points than relay tiers "
                             f"({len(self.net.tiers)}), got {self.model.cuts!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Nested sections, dotted keys or flat shorthand (see FLAT)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {d!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def validate(self) -> None:  # noqa: D102 - every value was checked when it was set
        """Kept for callers of the old flat config: values are checked when they are set."""

    def with_changes(self, **changes: Any) -> RunConfig:
        """A copy with flat shorthand or dotted keys changed, checked again."""
        return RunConfig.from_dict(merge(self.to_dict(), nest(changes)))


def describe(e: ValidationError) -> str:
    """The first error as one line naming the dotted field, e.g. "config field 'train.lr':
    Input should be greater than 0, got -1"."""
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return (f"config field {where!r}: unknown field (sections: {', '.join(SECTIONS)}; "
                f"flat names as the command line's, e.g. rounds, lr, dataset)")
    if not where and ": " in msg:  # a check across sections names its field first
        where, msg = msg.split(": ", 1)
        return f"config field {where!r}: {msg}"
    got = "" if "got" in msg else f", got {err.get('input')!r}"
    return f"config field {where or 'config'!r}: {msg}{got}"
