"""Client selection per round (algorithms.md 9): who takes part, decided by the controller.

Division of labour: `Selector` is the controller's policy, pure logic (testbed.run.experiment asks
it before each round and tells it each round's reports); the round command's meta carries the
chosen clients (`clients`), and `take_part` is the node's side: every node narrows the run's
client list to them for the round (so a server's barrier, concatenation and averaging cover
only participants) and a client not chosen sits the round out.

Policies (RunConfig.selection, e.g. {"policy": "rpowd", "m": 2, "d": 3, "deadline_s": 1.5}):
- all: every client (the baseline; m = K, d = K);
- random: m of the eligible clients, uniformly;
- rpowd: Power-of-Choice with the loss each client had when it last took part (the server
  computes it anyway and returns it with every gradient, 9 "Mapping to SL"); a candidate set
  A of d clients is drawn without replacement with probability proportional to shard size,
  and the m of A with the highest loss are chosen; never-chosen clients count as +inf, so
  every client is tried first. d = m reduces to random selection.
- deadline_s (with any policy): only clients whose predicted round time fits are eligible. The
  prediction is the client's own compute time (`compute_s`) of its last round: what a slow or
  throttled device cannot hide. Never-measured clients are eligible.
powd/cpowd (a fresh forward-only loss probe of the candidates) are not implemented.
"""

from __future__ import annotations

import math
from typing import Any

import torch

POLICIES = ("all", "random", "rpowd")


class SelectionError(ValueError):
    pass


class Selector:
    def __init__(self, spec: dict[str, Any], clients: list[str],
                 shard_sizes: dict[str, int] | None = None, seed: int = 0) -> None:
        unknown = sorted(set(spec) - {"policy", "m", "d", "deadline_s"})
        if unknown:
            raise SelectionError(f"selection: unknown field(s) {unknown}; valid: "
                                 f"['policy', 'm', 'd', 'deadline_s']")
        self.policy = spec.get("policy", "all")
        if self.policy not in POLICIES:
            raise SelectionError(f"selection field 'policy': expected one of {list(POLICIES)}"
                                 f" (powd/cpowd need a loss probe: not implemented), got "
                                 f"{self.policy!r}")
        k = len(clients)
        self.m = spec.get("m", k)
        self.d = spec.get("d", k)
        if not (isinstance(self.m, int) and 1 <= self.m <= k):
            raise SelectionError(f"selection field 'm': expected 1..{k} (the clients), got "
                                 f"{self.m!r}")
        if not (isinstance(self.d, int) and self.m <= self.d <= k):
            raise SelectionError(f"selection field 'd': expected m..K = {self.m}..{k}, got "
                                 f"{self.d!r}")
        self.deadline_s = spec.get("deadline_s")
        if self.deadline_s is not None and not (isinstance(self.deadline_s, (int, float))
                                                and self.deadline_s > 0):
            raise SelectionError(f"selection field 'deadline_s': expected seconds > 0, got "
                                 f"{self.deadline_s!r}")
        self.clients = list(clients)
        self.weights = {c: float((shard_sizes or {}).get(c, 1)) for c in clients}
        self.loss: dict[str, float] = {}        # last reported, per client
        self.predicted: dict[str, float] = {}   # seconds, per client
        self.gen = torch.Generator().manual_seed(seed * 7_777 + 1)

    def eligible(self) -> list[str]:
        if self.deadline_s is None:
            return list(self.clients)
        return [c for c in self.clients if self.predicted.get(c, 0.0) <= self.deadline_s]

    def sample(self, pool: list[str], n: int) -> list[str]:
        """n of `pool` without replacement, with probability proportional to shard size."""
        if n >= len(pool):
            return list(pool)
        w = torch.tensor([self.weights[c] for c in pool])
        return [pool[i] for i in torch.multinomial(w, n, replacement=False,
                                                   generator=self.gen).tolist()]

    def choose(self) -> tuple[list[str], dict[str, Any]]:
        """This round's participants (in run order) and what to log about the choice."""
        pool = self.eligible()
        info: dict[str, Any] = {"policy": self.policy, "eligible": pool}
        if self.policy == "all":
            chosen = pool
        elif self.policy == "random":
            chosen = self.sample(pool, self.m)
        else:
            cand = self.sample(pool, self.d)
            losses = {c: self.loss.get(c, math.inf) for c in cand}
            chosen = sorted(cand, key=lambda c: -losses[c])[:self.m]
            info.update(candidates=cand,
                        losses={c: (None if math.isinf(v) else v) for c, v in losses.items()})
        if not chosen:  # nobody fits the deadline: the fastest predicted one
            chosen = [min(self.clients, key=lambda c: self.predicted.get(c, 0.0))]
        if self.deadline_s is not None:
            info["predicted_s"] = {c: self.predicted.get(c) for c in self.clients}
        chosen = [c for c in self.clients if c in chosen]
        info["chosen"] = chosen
        return chosen, info

    def observe(self, reports: dict[str, dict[str, Any]]) -> None:
        """A round's node reports: the losses and compute times of the clients that took part."""
        for c, rep in reports.items():
            if c not in self.weights or not rep.get("selected", True):
                continue
            loss = rep.get("last_loss")
            if loss is None and rep.get("loss_n"):
                loss = rep["loss_sum"] / rep["loss_n"]
            if loss is not None:
                self.loss[c] = float(loss)
            if "compute_s" in rep:
                self.predicted[c] = float(rep["compute_s"])


def take_part(ctx: Any, meta: dict[str, Any], all_clients: list[str]) -> bool:
    """Apply a round command's participants (meta `clients`, default all) to this node;
    whether this node runs the round."""
    chosen = meta.get("clients")
    ctx.roles["client"] = [c for c in all_clients if chosen is None or c in chosen]
    if ctx.role == "client":
        ctx.extra["selected"] = chosen is None or ctx.name in chosen
        return ctx.extra["selected"]
    return True
