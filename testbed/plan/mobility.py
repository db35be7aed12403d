"""Mobility: where users are, and what that does to their radio link and serving cell.

Division of labour. Pure functions for the channel (algorithms.md 11.1 and the section 12
defaults): distance -> path loss -> SNR -> Shannon capacity, and distance -> propagation delay;
`Radio` holds every constant as data. `base_stations` reads the cells from a topology (nodes
tagged `pos` and `cell`, and `access`: the node at the other end of the cell's radio link, e.g.
topologies/cellular.py's bs<c> with access cell<c>). `Mobility` keeps users' positions and
serving cells: each position sample gives the cell links' new parameters and, when another cell
is stronger by the hysteresis, a handover. testbed.scenario.timeline applies them to the network.

The channel (section 12 defaults, [D] in the spec): path loss PL(d) = 128.1 + 37.6 log10(d/km)
dB, the 3GPP TR 36.814 (Table A.2.1.1.2-3) macro-cell model at 2 GHz; distances below 35 m
(TR 36.814's minimum UE-to-eNB distance) are taken as 35 m. SNR = p g / (N0 B) with
g = 10^(-PL/10), N0 = -174 dBm/Hz, B = 14 MHz (a 70 MHz band shared equally by 5 users, the
worked example), p = 0.2 W up (UE) and 1 W down (base station); rate R = B log2(1 + SNR) (11.1),
capped at 1000 Mbit/s (11.8). Shadowing: none by default; `shadowing_sigma_db` > 0 adds a
log-normal term per sample and cell, drawn from a numpy Generator seeded with the run's seed.
A cell's radio link is shared by its users: its capacity is the sum of its positioned users'
rates (each on its own B), its delay the declared one plus the farthest user's d / c.
Handover: to the strongest cell when it beats the serving cell by `hysteresis_db` (3 dB, a
typical 3GPP A3 offset).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from testbed.plan.latency import shannon_rate


@dataclass(frozen=True)
class Radio:
    """The mobility model's constants (YAML: a scenario's `radio:` mapping)."""

    pl_1km_db: float = 128.1          # path loss at 1 km, dB (3GPP TR 36.814 macro)
    pl_slope_db: float = 37.6         # dB per decade of distance
    min_distance_m: float = 35.0      # TR 36.814 minimum UE-eNB distance
    bandwidth_hz: float = 14e6        # one user's share B
    ue_power_w: float = 0.2           # uplink transmit power (23 dBm)
    bs_power_w: float = 1.0           # downlink transmit power
    n0_dbm_per_hz: float = -174.0     # noise power spectral density
    shadowing_sigma_db: float = 0.0   # log-normal shadowing (0: none, the spec's default)
    hysteresis_db: float = 3.0        # handover margin (A3 offset)
    max_rate_mbit: float = 1000.0     # Mininet's TCIntf cap (11.8)
    min_rate_mbit: float = 0.01       # a link never gets 0 (the relay needs a rate)
    speed_of_light_mps: float = 299_792_458.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Radio:
        if not isinstance(d, dict):
            raise ValueError(f"expected a mapping of radio constants, got {d!r}")
        known = [f.name for f in fields(cls)]
        for k, v in d.items():
            if k not in known:
                raise ValueError(f"unknown constant {k!r}; valid: {known}")
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ValueError(f"{k}: expected a number, got {v!r}")
            if k == "n0_dbm_per_hz":  # dBm/Hz: negative
                continue
            if v < 0 or (v == 0 and k not in ("shadowing_sigma_db", "hysteresis_db")):
                raise ValueError(f"{k}: expected a number > 0, got {v!r}")
        return cls(**{k: float(v) for k, v in d.items()})

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    # -- the channel ------------------------------------------------------------------------
    def path_loss_db(self, d_m: float) -> float:
        d = max(d_m, self.min_distance_m)
        return self.pl_1km_db + self.pl_slope_db * math.log10(d / 1000)

    def n0_w_per_hz(self) -> float:
        return 10 ** ((self.n0_dbm_per_hz - 30) / 10)

    def snr_db(self, pl_db: float, power_w: float) -> float:
        noise_dbm = self.n0_dbm_per_hz + 10 * math.log10(self.bandwidth_hz)
        return 10 * math.log10(power_w * 1000) - pl_db - noise_dbm

    def rate_mbit(self, pl_db: float, power_w: float) -> float:
        """Shannon capacity B log2(1 + p g / (N0 B)) of one user's share, Mbit/s, capped."""
        r = shannon_rate(self.bandwidth_hz, power_w, 10 ** (-pl_db / 10),
                         self.n0_w_per_hz()) / 1e6
        return min(max(r, self.min_rate_mbit), self.max_rate_mbit)

    def propagation_ms(self, d_m: float) -> float:
        return d_m / self.speed_of_light_mps * 1000


@dataclass(frozen=True)
class BaseStation:
    name: str
    cell: int
    pos: tuple[float, float]
    access: str | None  # the node at the UE side of the cell's radio link

    @property
    def link(self) -> tuple[str, str]:
        """The radio link, UE side first (its "up" is the uplink)."""
        return (self.access or self.name, self.name)


def base_stations(topo: Any) -> list[BaseStation]:
    """Nodes tagged `pos`, `cell` and `bs=True` (cellular.py's base stations), by cell."""
    out = []
    for n in topo.nodes():
        info = topo.nodeInfo(n)
        if info.get("bs") and info.get("pos") is not None and info.get("cell") is not None:
            x, y = info["pos"]
            out.append(BaseStation(n, int(info["cell"]), (float(x), float(y)),
                                   info.get("access")))
    return sorted(out, key=lambda b: b.cell)


def distance(a: Sequence[float], b: Sequence[float]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def waypoint_samples(waypoints: Sequence[Sequence[float]], speed: float, step: float
                     ) -> list[tuple[float, tuple[float, float]]]:
    """(seconds from the start, position) every `step` s along the polyline at `speed` m/s,
    from the first waypoint to exactly the last."""
    legs = list(zip(waypoints, waypoints[1:], strict=False))
    lengths = [distance(a, b) for a, b in legs]
    total = sum(lengths)
    out: list[tuple[float, tuple[float, float]]] = []
    k = 0
    while True:
        s = min(k * step * speed, total)
        done = 0.0
        for (a, b), length in zip(legs, lengths, strict=True):
            if s <= done + length or length == 0 and s <= done:
                f = 0.0 if length == 0 else (s - done) / length
                pos = (a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]))
                break
            done += length
        else:
            pos = (float(waypoints[-1][0]), float(waypoints[-1][1]))
        out.append((s / speed, (round(pos[0], 9), round(pos[1], 9))))
        if s >= total:
            return out
        k += 1


@dataclass
class Update:
    """What one position sample changed."""

    serving_before: int | None
    serving: int | None
    handover: int | None
    links: list[tuple[tuple[str, str], dict[str, Any]]]
    cells: dict[int, dict[str, float]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"serving": self.serving, "cells": self.cells}


class Mobility:
    """Users' positions and serving cells over a set of base stations."""

    def __init__(self, radio: Radio, stations: list[BaseStation], *, seed: int,
                 cells: Callable[[str], int | None],
                 base_delay: Callable[[tuple[str, str]], tuple[float, float]] | None = None
                 ) -> None:
        self.radio, self.stations = radio, {b.cell: b for b in stations}
        self.rng = np.random.default_rng(seed)
        self.initial_cell = cells
        self.base_delay = base_delay or (lambda link: (0.0, 0.0))
        self.pos: dict[str, tuple[float, float]] = {}
        self.serving: dict[str, int | None] = {}
        self.loss: dict[str, dict[int, float]] = {}  # user -> cell -> path loss incl. shadowing

    def measure(self, pos: tuple[float, float]) -> dict[int, dict[str, float]]:
        """Per cell: distance, path loss (with a shadowing draw when sigma > 0)."""
        out = {}
        for c in sorted(self.stations):
            d = distance(pos, self.stations[c].pos)
            pl = self.radio.path_loss_db(d)
            if self.radio.shadowing_sigma_db > 0:
                pl += float(self.rng.normal(0.0, self.radio.shadowing_sigma_db))
            out[c] = {"distance_m": d, "path_loss_db": pl,
                      "snr_up_db": self.radio.snr_db(pl, self.radio.ue_power_w)}
        return out

    def place(self, user: str, pos: tuple[float, float]) -> dict[int, dict[str, float]]:
        """Put `user` at `pos` in its current cell (no handover decision)."""
        if not self.stations:
            raise ValueError("mobility: the topology has no base stations")
        if user not in self.serving:
            self.serving[user] = self.initial_cell(user)
        cells = self.measure(pos)
        self.pos[user] = pos
        self.loss[user] = {c: m["path_loss_db"] for c, m in cells.items()}
        return cells

    def links(self) -> list[tuple[tuple[str, str], dict[str, Any]]]:
        """Every cell link with positioned users, and its parameters."""
        out = [(b.link, self.cell_params(c)) for c, b in sorted(self.stations.items())]
        return [(k, p) for k, p in out if p]

    def update(self, user: str, pos: tuple[float, float]) -> Update:
        """Move `user` to `pos`: hand over when another cell beats the serving one by the
        hysteresis; the links of the cells it left and is in get new parameters."""
        before = self.serving.get(user, self.initial_cell(user))
        cells = self.place(user, pos)
        best = min(cells, key=lambda c: (cells[c]["path_loss_db"], c))
        margin = (math.inf if before not in cells
                  else cells[before]["path_loss_db"] - cells[best]["path_loss_db"])
        target = best if best != before and margin > self.radio.hysteresis_db else None
        if target is not None:
            self.serving[user] = target
        affected = sorted({c for c in (before, self.serving[user]) if c in self.stations})
        links = [(self.stations[c].link, self.cell_params(c)) for c in affected]
        return Update(before, self.serving[user], target, [(k, p) for k, p in links if p],
                      {c: {k: round(v, 6) for k, v in m.items()} for c, m in cells.items()})

    def cell_params(self, cell: int) -> dict[str, Any]:
        """The cell link's parameters for the users positioned in it (empty: none are)."""
        users = [u for u, c in self.serving.items() if c == cell and u in self.pos]
        if not users:
            return {}
        r = self.radio
        up = sum(r.rate_mbit(self.loss[u][cell], r.ue_power_w) for u in users)
        down = sum(r.rate_mbit(self.loss[u][cell], r.bs_power_w) for u in users)
        far = max(distance(self.pos[u], self.stations[cell].pos) for u in users)
        base_up, base_down = self.base_delay(self.stations[cell].link)
        prop = r.propagation_ms(far)
        return {"bw_up": round(min(up, r.max_rate_mbit), 6),
                "bw_down": round(min(down, r.max_rate_mbit), 6),
                "delay_up": round(base_up + prop, 6), "delay_down": round(base_down + prop, 6)}
