"""Efficient parallel split learning, EPSL (algorithms.md section 6): PSL plus last-layer
gradient aggregation.

Per iteration the server runs PSL's forward over the N concatenated batches and gets G, the
gradient of the mean loss at the server output (N x b rows). The first k_a = round(phi*b)
batch positions are aggregated: their rows are summed over clients into one row per position
and back-propagated once, through client j mod N (representative-sample BP, 6.2 step 4). The
cut-layer row that comes out is the same for every client and goes out as GRAD_BCAST; the
other b - k_a rows of each client go back as in PSL (GRAD). Server BP handles
b*(phi + N*(1 - phi)) vectors instead of N*b: at phi=1 that is b, whatever N; phi=0 is PSL.

Options ([D] in the spec), besides PSL's client_grad_scale and u_shaped:
- phi in [0, 1];
- epsl_bp_mode, how an aggregated row is back-propagated (docs/schemes.md has the measured
  accuracy of each):
  representative: the sum over clients, through client j mod N's activations (above);
  mean_activation: the sum over clients, through the mean over clients of the activations at
    that position (one more server forward of k_a rows, the only place the mean exists);
  representative_unbiased, mean_activation_unbiased: as those, but the aggregated row is N
    times the sum, so that the part of it that comes from a sample's own label has the
    weight it has in PSL (the sum alone carries each sample's own error at 1/N: server and
    clients then learn at 1/N of PSL's rate); what every client gets is scaled alike;
  last_layer: the server's last unit back-propagates every row exactly (its weight gradient
    is PSL's); the gradients at its input are summed over clients at the aggregated
    positions and go on through the representative's activations (the aggregation at "the
    last layer" taken literally); the b rows count the rest of the server's BP;
  last_layer_unbiased: the server as last_layer; each client gets N times last_layer's
    shared row (the sum over clients instead of their mean, so its own error has PSL's
    weight; the server's step is not scaled);
  label_matched: the N*k_a aggregated samples are grouped by label instead of by position
    (sorted by label, cut into k_a groups of N), each group's sum back-propagated through one
    member's activations; the k_a shared rows are broadcast and each client is told which
    row is each of its samples' (k_a small integers in the message's meta). Samples of one
    label have similar output errors, so the shared row is close to each member's own;
  cutlayer_average: PSL's full backward, then the aggregated cut rows averaged over clients
  (the server update is PSL's, only the downlink changes; an ablation, N*b BP rows);
- epsl_bp_compute: masked (one backward whose seed has zero rows: the counters show the work
  saved, the CPU does not) | subset (a forward without graph for G, then forward and backward
  over the needed rows only: the saving is real, at the cost of a second forward, and BN
  layers would see the subset's batch statistics).
On the ZeroMQ star a "broadcast" is one GRAD_BCAST per client; counters give the rows and bytes
a broadcast medium would carry once (grad_*_down) beside the measured per-type bytes.

In a chain (docs/multitier.md) the aggregation happens at the last tier, the server. A relay
back-propagates what it receives, each client's full cut gradient (its shared and own rows),
through its segments at that client's activations; the gradient that comes out differs per
client in every row, so it goes down as that client's own, in the same two messages
(GRAD_BCAST: the first k_a rows, GRAD: the rest) so clients run unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nodes.context import NodeContext
from nodes.protocol import Endpoint
from nodes.schemes.common import Batch, send_cut_grads, send_grad, server_forward
from nodes.schemes.psl import PSL


def aggregated_positions(phi: float, b: int) -> int:
    """k_a = round(phi*b), rounding halves up (both ends must agree on it)."""
    return int(math.floor(phi * b + 0.5))


BP_MODES = ("representative", "mean_activation", "representative_unbiased",
            "mean_activation_unbiased", "last_layer", "last_layer_unbiased", "label_matched",
            "cutlayer_average")


def agg_factor(mode: str, n: int) -> float:
    """What multiplies the sum over clients of an aggregated position's output gradient
    (last_layer_unbiased scales only what the clients get: split_downlink)."""
    return float(n) if mode.endswith("_unbiased") and not mode.startswith("last") else 1.0


def representative_seed(G: torch.Tensor, k_a: int, factor: float = 1.0) -> torch.Tensor:
    """G' from G (N, b, ...): position j < k_a carries `factor` times the sum over clients at
    client j mod N and zero elsewhere; positions j >= k_a are unchanged."""
    seed = G.clone()
    if k_a:
        j = torch.arange(k_a)
        summed = G[:, :k_a].sum(0) * factor
        seed[:, :k_a] = 0
        seed[j % G.shape[0], j] = summed
    return seed


def label_groups(labels: torch.Tensor, k_a: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (N, b): the samples at positions < k_a of every client, sorted by label (stable,
    client-major) and cut into k_a groups of N. Returns members (k_a, N), flat indices into
    N*b, the representative (first) member of group g at column g mod N; and group (N, k_a),
    the group of each client's aggregated sample."""
    n, b = labels.shape
    flat = (torch.arange(n)[:, None] * b + torch.arange(k_a)[None, :]).reshape(-1)
    order = torch.sort(labels[:, :k_a].reshape(-1), stable=True).indices
    members = flat[order].view(k_a, n)
    members = torch.stack([m.roll(-(g % n)) for g, m in enumerate(members)])  # rep first
    group = torch.empty(n * b, dtype=torch.long)
    group[members.reshape(-1)] = torch.arange(k_a).repeat_interleave(n)
    return members, group.view(n, b)[:, :k_a]


def backprop_rows(n: int, b: int, k_a: int) -> torch.Tensor:
    """Flat indices (into N*b) of the rows representative-sample BP needs."""
    j = torch.arange(k_a)
    rest = torch.arange(n * b).view(n, b)[:, k_a:].reshape(-1)
    return torch.cat([(j % n) * b + j, rest])


def split_downlink(xgrad: torch.Tensor, k_a: int, scale: float,
                   mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """From the cut gradient (N, b, ...) of the mean loss: the k_a rows every client shares
    and the (N, b - k_a) rows each gets alone, both on the per-client scale `scale` implies."""
    n, j = xgrad.shape[0], torch.arange(k_a)
    if mode.startswith(("representative", "last_layer")):  # one client's Jacobian
        shared = xgrad[j % n, j] * (scale / n)
        if mode == "last_layer_unbiased":  # the sum over clients, not their mean
            shared = shared * n
    else:
        shared = (xgrad[:, :k_a] * scale).mean(0)
    return shared, xgrad[:, k_a:] * scale


class EPSL(PSL):
    name = "epsl"
    label = "EPSL"
    latency = "psl_epsl"
    options = {**{k: v for k, v in PSL.options.items() if k != "psl_server_mode"},
               "phi": 0.5, "epsl_bp_mode": "representative", "epsl_bp_compute": "masked"}
    choices = {**{k: v for k, v in PSL.choices.items() if k != "psl_server_mode"},
               "epsl_bp_mode": BP_MODES,
               "epsl_bp_compute": ("masked", "subset")}

    def __init__(self, **opts) -> None:
        super().__init__(**opts)
        if not 0.0 <= self.opts["phi"] <= 1.0:
            raise ValueError(f"scheme 'epsl': option phi={self.opts['phi']!r} must be in [0, 1]")
        if self.opts["epsl_bp_mode"] == "label_matched" and self.opts["u_shaped"]:
            raise ValueError("scheme 'epsl': epsl_bp_mode=label_matched groups by label, which "
                             "a u_shaped server does not have")

    def latency_model(self) -> tuple[str, dict[str, Any]] | None:
        name, params = super().latency_model()
        return name, ({"phi": float(self.opts["phi"])} if name == "psl_epsl" else params)

    def check_run(self, run: Mapping[str, Any]) -> None:
        method = (run.get("compression") or {}).get("method")
        if method in ("c3sl", "topk"):
            raise ValueError(f"config field 'compression': {method} codes each client's rows, "
                             f"EPSL's shared gradient rows are not any one client's: use method "
                             f"quant with epsl")

    def concatenates(self) -> bool:
        return True

    def server_update(self, ctx: NodeContext, model: nn.Module,
                      opts: list[torch.optim.Optimizer], batch: Batch, rnd: int,
                      step: int) -> None:
        n, b = len(batch), len(batch[0][1].tensors["act"])
        if any(len(m.tensors["act"]) != b for _, m in batch):
            raise ValueError("epsl aggregates batch positions across clients: every client "
                             "needs the same batch size (a shard smaller than batch_size?)")
        k_a, mode = aggregated_positions(self.opts["phi"], b), self.opts["epsl_bp_mode"]
        factor = agg_factor(mode, n)
        mean_act = mode.startswith("mean_activation") and k_a > 0
        subset = self.opts["epsl_bp_compute"] == "subset" and mode.startswith("representative")
        last = mode.startswith("last_layer") and k_a > 0
        matched = mode == "label_matched" and k_a > 0
        if last:  # the last unit's input, inside the forward's graph
            seen: list[torch.Tensor] = []
            hook = model[-1].register_forward_hook(lambda _m, i, _o: seen.append(i[0]))
        try:
            p = server_forward(self, ctx, model, batch, rnd, step, grad=not subset)
        finally:
            if last:
                hook.remove()
        with ctx.compute():
            G = p.G.unflatten(0, (n, b))
            if mode.startswith("representative"):
                seed = representative_seed(G, k_a, factor)
            elif matched:
                labels = torch.stack([m.tensors["labels"] for _, m in batch])
                members, groups = label_groups(labels, k_a)
                flat = G.flatten(0, 1)
                seed = flat.clone()
                seed[members.reshape(-1)] = 0
                seed[members[:, 0]] = flat[members].sum(1)
                seed = seed.view_as(G)
            elif mean_act:  # the aggregated positions go through the mean activations below
                seed = G.clone()
                seed[:, :k_a] = 0
            else:
                seed = G
            seed = seed.flatten(0, 1)
            for o in opts:
                o.zero_grad(set_to_none=True)
            if last:
                head = [q for q in model[-1].parameters() if q.requires_grad]
                dh, *dw = torch.autograd.grad(p.out, [seen[0], *head], p.G)
                for q, g in zip(head, dw, strict=True):
                    q.grad = g
                seen[0].backward(representative_seed(dh.unflatten(0, (n, b)), k_a)
                                 .flatten(0, 1))
                xgrad = p.x.grad
            elif subset:
                rows = backprop_rows(n, b, k_a)
                xs = p.x.detach()[rows].requires_grad_()
                model(xs).backward(seed[rows])
                xgrad = torch.zeros_like(p.x)
                xgrad[rows] = xs.grad
            else:
                p.out.backward(seed)
                xgrad = p.x.grad
            if mean_act:
                xbar = p.x.detach().unflatten(0, (n, b))[:, :k_a].mean(0).requires_grad_()
                model(xbar).backward(G[:, :k_a].sum(0) * factor)
                xgrad = xgrad.unflatten(0, (n, b)).clone()
                # every client's row j: the one from the mean, on the server objective's
                # scale split over the n clients (split_downlink averages them back)
                xgrad[:, :k_a] = xbar.grad / n
                xgrad = xgrad.flatten(0, 1)
            for o in opts:
                o.step()
            shared, own = split_downlink(xgrad.unflatten(0, (n, b)), k_a,
                                         self.grad_scale(n), mode)
            if matched:  # group g's row came from its representative: already summed
                shared = xgrad[members[:, 0]] * (self.grad_scale(n) / n)
        ctx.count(server_steps=1,
                  server_bp_vectors=n * b if mode == "cutlayer_average" else k_a + n * (b - k_a))
        if k_a:
            for i, c in enumerate(p.clients):
                nbytes = ctx.router.send("GRAD_BCAST", to=c, round=rnd, step=step,
                                         tensors={"grad": shared},
                                         meta={"rows": groups[i].tolist()} if matched else None)
                if i == 0:  # what one broadcast would carry
                    ctx.count(grad_rows_down=k_a, grad_bytes_down=nbytes)
        if k_a < b:
            send_cut_grads(ctx, p, list(own), rnd, step)

    def send_cut_grad(self, ctx: NodeContext, c: str, grad: torch.Tensor, rnd: int,
                      step: int, meta: dict | None = None) -> None:
        k_a = aggregated_positions(self.opts["phi"], len(grad))
        for mtype, rows in (("GRAD_BCAST", grad[:k_a]), ("GRAD", grad[k_a:])):
            if len(rows):
                send_grad(ctx, c, mtype, rows, rnd, step, meta if mtype == "GRAD" else None)

    def recv_cut_grad(self, ctx: NodeContext, ep: Endpoint, rnd: int, step: int,
                      b: int) -> torch.Tensor:
        k_a = aggregated_positions(self.opts["phi"], b)
        parts = []
        if k_a:
            msg = ctx.expect(ep, "GRAD_BCAST", rnd, step)[1]
            rows = msg.tensors["grad"]
            if "rows" in msg.meta:  # label_matched: which shared row is each sample's
                rows = rows[torch.tensor(msg.meta["rows"], dtype=torch.long)]
            parts.append(rows)
        if k_a < b:
            parts.append(ctx.expect(ep, "GRAD", rnd, step)[1].tensors["grad"])
        return torch.cat(parts) if len(parts) > 1 else parts[0]
