"""What a link is: rate, delay, jitter, loss and queue limit, per direction, as plain data.

One model for every backend. Topologies speak Mininet's vocabulary (`bw` in Mbit/s, `delay` as
'5ms', `loss` in percent, `max_queue_size` in packets); `LinkParams.from_mininet` turns that into
this model, and the backends (testbed.emu.relay on this netem-less kernel) only ever see it. Presets
give named, typical link classes. Nothing here touches the network.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

MTU_BYTES = 1500  # Mininet's max_queue_size counts packets; we count bytes of full-size packets
MIN_QUEUE_BYTES = 128 * 1024  # at least two 64 KB GSO super-packets must fit
QUEUE_SECONDS = 0.1  # default queue: 100 ms at the link rate, the classic "one BDP" buffer


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Direction:
    """One direction of a link. Checked on construction; errors name the field and value."""

    bw_mbit: float | None = None  # None = unlimited; values above 1000 allowed
    delay_ms: float = 0.0  # one-way propagation delay
    jitter_ms: float = 0.0  # uniform +-jitter; packet order is kept (departures FIFO-clamped)
    loss: float = 0.0  # Bernoulli loss probability in [0, 1): a fraction, not percent
    queue_bytes: int | None = None  # drop-tail limit of the rate queue; None = default_queue()

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"link direction: {name} must be {what}, got {getattr(self, name)!r}")

        if self.bw_mbit is not None and not (_finite(self.bw_mbit) and self.bw_mbit > 0):
            raise bad("bw_mbit", "a number > 0 (Mbit/s) or None for unlimited")
        for name in ("delay_ms", "jitter_ms"):
            v = getattr(self, name)
            if not (_finite(v) and v >= 0):
                raise bad(name, "a number >= 0 (ms)")
        if not (_finite(self.loss) and 0 <= self.loss < 1):
            raise bad("loss", "a fraction in [0, 1)")
        q = self.queue_bytes
        if q is not None and not (isinstance(q, int) and not isinstance(q, bool) and q > 0):
            raise bad("queue_bytes", "an integer > 0 or None")

    def queue_limit(self) -> int | None:
        """Bytes the rate queue may hold (None when the direction has no rate limit)."""
        if self.bw_mbit is None:
            return None
        if self.queue_bytes is not None:
            return self.queue_bytes
        return max(MIN_QUEUE_BYTES, int(self.bw_mbit * 1e6 / 8 * QUEUE_SECONDS))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # -- the one translation to Mininet/tc arguments (every backend uses these) ----------------
    def queue_packets(self) -> int | None:
        """The queue as tc/Mininet count it, in full-size packets: rounded up, so a queue
        never holds less than declared (None: no explicit queue)."""
        if self.queue_bytes is None:
            return None
        return max(1, -(-self.queue_bytes // MTU_BYTES))

    def tc_kwargs(self, *, always_delay: bool = False) -> dict[str, Any]:
        """TCLink's per-interface parameters (bw, delay, jitter, loss in percent,
        max_queue_size in packets), defaults left out; `always_delay` keeps a netem qdisc
        (delay 0ms) on the interface so that later changes can `tc qdisc change` it."""
        out: dict[str, Any] = {}
        if self.bw_mbit is not None:
            out["bw"] = self.bw_mbit
        if self.delay_ms or always_delay:
            out["delay"] = f"{self.delay_ms:.12g}ms"
        if self.jitter_ms:
            out["jitter"] = f"{self.jitter_ms:.12g}ms"
        if self.loss:
            out["loss"] = self.loss * 100
        if (packets := self.queue_packets()) is not None:
            out["max_queue_size"] = packets
        return out

    def netem_args(self, loss: float | None = None) -> str:
        """The netem part of `tc qdisc change ... netem <args>` for this direction; `loss`
        (a fraction) in place of the model's, for a cut link."""
        packets = self.queue_packets()
        loss = self.loss if loss is None else loss
        return (f"delay {self.delay_ms:.12g}ms {self.jitter_ms:.12g}ms loss {loss * 100:.5f}%"
                + (f" limit {packets}" if packets is not None else ""))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Direction:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"link direction: unknown field(s) {unknown}; valid: {sorted(known)}")
        return cls(**d)


# Mininet link keyword -> (Direction field, converter). `loss` is a percent there, a fraction here.
_DELAY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|ms|s)?\s*$")
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, None: 1.0}
# Which qdisc Mininet would shape with: meaningless for our rate model, accepted and ignored.
_IGNORED = frozenset({"use_htb", "use_hfsc", "use_tbf"})


def _number(key: str, v: Any) -> float:
    if isinstance(v, str):
        try:
            v = float(v.strip().rstrip("%"))
        except ValueError:
            raise ValueError(f"link parameter {key}={v!r}: expected a number") from None
    if not _finite(v):
        raise ValueError(f"link parameter {key}={v!r}: expected a finite number")
    return float(v)


def _time_ms(key: str, v: Any) -> float:
    if v is None:
        return 0.0
    if isinstance(v, str):
        m = _DELAY_RE.match(v)
        if not m:
            raise ValueError(f"link parameter {key}={v!r}: expected e.g. '5ms', '250us', 0.5")
        ms = float(m.group(1)) * _UNIT_MS[m.group(2)]
    else:
        ms = _number(key, v)
    if ms < 0:
        raise ValueError(f"link parameter {key}={v!r}: must be >= 0")
    return ms


def _bw(key: str, v: Any) -> float | None:
    if v is None:
        return None
    bw = _number(key, v)
    if bw <= 0:
        raise ValueError(f"link parameter {key}={v!r}: must be > 0 Mbit/s (None = unlimited)")
    return bw


def _loss(key: str, v: Any) -> float:
    pct = 0.0 if v is None else _number(key, v)
    if not 0 <= pct < 100:
        raise ValueError(f"link parameter {key}={v!r}: a percentage in [0, 100) as in Mininet")
    return pct / 100


def _queue(key: str, v: Any) -> int | None:
    if v is None:
        return None
    n = _number(key, v)
    if n <= 0 or n != int(n):
        raise ValueError(f"link parameter {key}={v!r}: a whole number of packets > 0")
    return int(n) * MTU_BYTES


_MININET = {
    "bw": ("bw_mbit", _bw),
    "delay": ("delay_ms", _time_ms),
    "jitter": ("jitter_ms", _time_ms),
    "loss": ("loss", _loss),
    "max_queue_size": ("queue_bytes", _queue),
}


def _parse_mininet(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mininet-style kwargs -> (up, down) dicts of only the Direction fields that were given.
    `x` sets both directions, `x_up` / `x_down` one; the specific key wins."""
    up: dict[str, Any] = {}
    down: dict[str, Any] = {}
    valid = sorted([*_MININET, *(f"{k}_{s}" for k in _MININET for s in ("up", "down"))])
    for key in params:
        base, _, side = key.rpartition("_")
        if key not in _MININET and key not in _IGNORED and not (
            side in ("up", "down") and base in _MININET
        ):
            raise ValueError(f"link parameter {key!r} is unknown; valid: {valid}")
    for key, (name, conv) in _MININET.items():
        if key in params:
            up[name] = down[name] = conv(key, params[key])
        for side, out in (("up", up), ("down", down)):
            k = f"{key}_{side}"
            if k in params:
                out[name] = conv(k, params[k])
    return up, down


@dataclass(frozen=True)
class LinkParams:
    """Both directions of a link. `up` is node1 -> node2 as the topology declared the link."""

    up: Direction = Direction()
    down: Direction = Direction()

    @classmethod
    def from_mininet(cls, **params: Any) -> LinkParams:
        """From Mininet link kwargs: bw (Mbit/s), delay / jitter ('5ms' or ms), loss (PERCENT),
        max_queue_size (packets of 1500 B), each also as `_up` / `_down` for one direction."""
        up, down = _parse_mininet(params)
        return cls(up=Direction(**up), down=Direction(**down))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LinkParams:
        unknown = sorted(set(d) - {"up", "down"})
        if unknown:
            raise ValueError(f"link params: unknown key(s) {unknown}; valid: ['down', 'up']")
        return cls(up=Direction.from_dict(d.get("up") or {}),
                   down=Direction.from_dict(d.get("down") or {}))

    def to_dict(self) -> dict[str, Any]:
        return {"up": self.up.to_dict(), "down": self.down.to_dict()}

    def to_mininet(self) -> dict[str, Any]:
        """The Mininet link kwargs `Topo.addLink` takes (the inverse of `from_mininet`): one key
        where both directions agree, `_up` / `_down` keys where they differ, defaults left out
        (so this is for declaring a link, not for `set_link`, which keeps what is left out).
        A queue that is not a whole number of 1500-byte packets is rounded up to one."""
        up, down = self.up.tc_kwargs(), self.down.tc_kwargs()
        out = {k: v for k, v in up.items() if down.get(k) == v}
        out.update({f"{k}_up": v for k, v in up.items() if k not in out})
        out.update({f"{k}_down": v for k, v in down.items() if k not in out})
        return out


def _sym(**kw: Any) -> LinkParams:
    return LinkParams(up=Direction(**kw), down=Direction(**kw))


# Typical figures from standards targets and common deployments, NOT measurements. They give
# link classes sensible defaults; a study that depends on a number should set it explicitly.
# For asymmetric presets node1 (`up` side) is the device: declare links as (device, network).
PRESETS: dict[str, LinkParams] = {
    # 5G NR eMBB as a user sees it: ITU-R M.2410 user-experienced rates of 100 Mbit/s down and
    # 50 Mbit/s up; ~10 ms one way to an edge site (radio + core, well above the 4 ms user-plane
    # target); 0.1 % residual loss after HARQ/RLC.
    "cellular": LinkParams(
        up=Direction(bw_mbit=50, delay_ms=10, jitter_ms=2, loss=0.001),
        down=Direction(bw_mbit=100, delay_ms=10, jitter_ms=2, loss=0.001),
    ),
    # Microwave / mmWave (E-band) radio backhaul of a few km: ~1 Gbit/s, ~1 ms, rare fades.
    "wireless-backhaul": _sym(bw_mbit=1000, delay_ms=1, jitter_ms=0.2, loss=0.0001),
    # Fibre from the edge site to a regional cloud ~1000 km away (5 us/km). 10 Gbit/s is more than
    # a Python relay forwards (~3.5 Gbit/s), so in practice this link is limited by the relay.
    "wired-backhaul": _sym(bw_mbit=10000, delay_ms=5),
    # Device-to-device sidelink (NR PC5 / Wi-Fi Direct class) at short range.
    "d2d": _sym(bw_mbit=20, delay_ms=5, jitter_ms=2, loss=0.01),
    # Vehicle-to-vehicle: IEEE 802.11p at its 6 Mbit/s default rate; a few ms of channel access
    # with variance; 2 % loss, within 3GPP TS 22.186's 90-99 % reliability for basic V2X.
    "v2v": _sym(bw_mbit=6, delay_ms=5, jitter_ms=3, loss=0.02),
    # One hop of an 802.11s Wi-Fi mesh: tens of Mbit/s of goodput, contention jitter, some loss.
    "mesh": _sym(bw_mbit=30, delay_ms=2, jitter_ms=1, loss=0.005),
    # Switched Gigabit Ethernet.
    "lan": _sym(bw_mbit=1000, delay_ms=0.1),
}


def preset(name: str, **overrides: Any) -> LinkParams:
    """A named preset, with Mininet-style overrides (same keys as `from_mininet`), e.g.
    `preset("cellular", delay="20ms", bw_up=10)`."""
    if name not in PRESETS:
        raise ValueError(f"link preset {name!r} is unknown; valid: {sorted(PRESETS)}")
    p = PRESETS[name]
    up, down = _parse_mininet(overrides)
    return LinkParams(up=replace(p.up, **up), down=replace(p.down, **down))
