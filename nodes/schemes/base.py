"""The scheme interface: one split-learning algorithm is one class behind it.

A scheme is the schedule (as in torch.distributed.pipelining), not the stages: it says which
model segments each role holds and what a node of each role does in one round, using the
NodeContext the runtime gives it (segments, optimizers, data, endpoints, metrics). The runtime
and the wire protocol never branch on which scheme runs: it calls `<role>_round`.
Adding a scheme means adding one file in nodes/schemes/ with a subclass that sets `name`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from nodes.context import NodeContext

REGISTRY: dict[str, type[Scheme]] = {}


class Scheme:
    name: ClassVar[str] = ""
    roles: ClassVar[tuple[str, ...]] = ("client", "server")
    # Option name -> default; unknown options are rejected by name.
    options: ClassVar[dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, **opts: Any) -> None:
        unknown = set(opts) - set(self.options)
        if unknown:
            raise ValueError(
                f"scheme {self.name!r}: unknown option(s) {sorted(unknown)}; "
                f"valid: {sorted(self.options)}"
            )
        self.opts = {**self.options, **opts}

    # -- placement: data, not code ---------------------------------------------------------
    def placement(self, num_segments: int, clients: list[str],
                  servers: list[str]) -> dict[str, list[int]]:
        """Segments each node holds. Default: two-tier, clients the first, servers the rest."""
        out = {c: [0] for c in clients}
        out.update({s: list(range(1, num_segments)) for s in servers})
        return out

    def connections(self, clients: list[str], servers: list[str]) -> list[tuple[str, str]]:
        """(dealer, router) pairs: who connects to whom on the data plane."""
        return [(c, s) for c in clients for s in servers]

    def model_of(self, client: str, placement: dict[str, list[int]],
                 num_segments: int) -> list[tuple[str, int]]:
        """(node, segment) that make up the model client `client` is evaluated with."""
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
