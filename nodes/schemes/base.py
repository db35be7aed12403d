"""The scheme interface: one split-learning algorithm is one class behind it.

A scheme is the schedule (as in torch.distributed.pipelining), not the stages: it says which
roles it needs, which model segments each node holds, who connects to whom, and what a node of
each role does in one round, using the NodeContext the runtime gives it (segments, optimizers,
data, endpoints, metrics). The runtime and the wire protocol never branch on which scheme runs:
the runtime calls `<role>_round` (e.g. `client_round`, `server_round`, `fedserver_round`).
Adding a scheme means adding one file in nodes/schemes/ with a subclass that sets `name`.

`roles` maps a role to the host names that play it (from the topology's `role=` host
parameter); every scheme has "client" hosts, which hold the training data. A scheme that runs
over chains (client -> relay tier(s) -> server, docs/multitier.md) places segments on the
relays (`chain_placement`) and says what a relay does in a round (`relay_round`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from nodes.context import NodeContext

REGISTRY: dict[str, type[Scheme]] = {}
Roles = dict[str, list[str]]


class Scheme:
    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # how tables and plots name it (default: `name`)
    # The analytic model that prices one iteration (testbed.plan.latency: psl_epsl, sflv1,
    # sflv2, vanilla_sl, ushaped); None: the scheme has none. See latency_model().
    latency: ClassVar[str | None] = None
    roles: ClassVar[tuple[str, ...]] = ("client", "server")
    # Option name -> default; unknown options are rejected by name, and a value must have
    # the default's type. Design decisions the spec marks [D] are options.
    options: ClassVar[dict[str, Any]] = {}
    # Option name -> allowed values, for options that pick one of listed alternatives.
    choices: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # Whether clients take turns (vanilla SL) rather than compute at the same time: analysis
    # (testbed.report.compare) adds their compute times on the critical path instead of taking
    # the max.
    sequential_clients: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The first class of a name keeps it: a user's subclass of PSL (named by reference,
        # nodes.imports) inherits "psl" and must not replace the built-in under that name.
        if cls.name and "name" in cls.__dict__:
            REGISTRY.setdefault(cls.name, cls)

    def __init__(self, **opts: Any) -> None:
        unknown = set(opts) - set(self.options)
        if unknown:
            raise ValueError(
                f"scheme {self.name!r}: unknown option(s) {sorted(unknown)}; "
                f"valid: {sorted(self.options)}"
            )
        self.opts = {**self.options, **opts}
        for key, value in opts.items():
            default = self.options[key]
            # ints are accepted where a float is the default (phi=1 means phi=1.0)
            numeric = isinstance(default, float) and type(value) is int
            if type(value) is not type(default) and not numeric:
                raise ValueError(f"scheme {self.name!r}: option {key}={value!r} must be a "
                                 f"{type(default).__name__}")
            if key in self.choices and value not in self.choices[key]:
                raise ValueError(f"scheme {self.name!r}: option {key}={value!r}; valid: "
                                 f"{list(self.choices[key])}")

    # -- what the controller asks of a scheme (it never compares scheme names) ----------------
    def display(self) -> str:
        """The scheme and its options as a table row names them, e.g. "EPSL phi=0.5"."""
        return " ".join([self.label or self.name]
                        + [f"{k}={v}" for k, v in self.opts.items() if v != self.options[k]])

    def latency_model(self) -> tuple[str, dict[str, Any]] | None:
        """(model, parameters): which analytic model prices one iteration of this scheme as
        configured, e.g. ("psl_epsl", {"phi": 0.5}); None: there is none."""
        return (self.latency, {}) if self.latency else None

    def check_run(self, run: Mapping[str, Any]) -> None:
        """Refuse, before anything starts, a run configuration (RunConfig's fields) this
        scheme cannot run: raise ValueError naming the config field."""

    # -- placement: data, not code ---------------------------------------------------------
    def placement(self, num_segments: int, roles: Roles) -> dict[str, list[int]]:
        """Segments each node holds. Default: two-tier, clients the first, servers the rest."""
        out = {c: [0] for c in roles["client"]}
        out.update({s: list(range(1, num_segments)) for s in roles["server"]})
        return out

    def chain_placement(self, num_segments: int, roles: Roles, tiers: list[str],
                        by_tier: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
        """Segments each node holds when relays of the roles `tiers` (client side first) sit
        between the clients and the server (an N-segment chain); `by_tier`: tier -> segments
        when the controller placed them. Default: not supported."""
        raise ValueError(f"scheme {self.name!r} does not run over a chain of relays "
                         f"(tiers {tiers})")

    def round_of(self, role: str, relay: bool = False) -> Any:
        """What a node of `role` runs each round: `<role>_round`, or `relay_round` for a
        relay of a chain."""
        return self.relay_round if relay else getattr(self, f"{role}_round")

    def connections(self, roles: Roles) -> list[tuple[str, str]]:
        """(dealer, router) pairs: who connects to whom on the data plane."""
        return [(c, s) for c in roles["client"] for s in roles["server"]]

    def model_of(self, client: str, placement: dict[str, list[int]],
                 num_segments: int) -> list[tuple[str, int]]:
        """(node, segment) that make up the model client `client` is evaluated with:
        its own segments, and each other segment from the first node that holds it."""
        parts = []
        for seg in range(num_segments):
            if seg in placement.get(client, []):
                parts.append((client, seg))
            else:
                owner = next(n for n, segs in placement.items() if seg in segs)
                parts.append((owner, seg))
        return parts

    # -- one round, per role -----------------------------------------------------------------
    def client_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        raise NotImplementedError

    def server_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        raise NotImplementedError

    def relay_round(self, ctx: NodeContext, rnd: int, iters: int) -> None:
        raise NotImplementedError
