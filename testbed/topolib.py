"""What topology scripts share: parameters given inline or as YAML, and link classes as presets.

Topology scripts stay small and declarative; the little machinery they have in common lives here
so that a parameter means the same thing in every script.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from testbed.linkmodel import preset


def load(spec: dict | str | None) -> dict:
    """A parameter mapping given inline or as a YAML file path."""
    if isinstance(spec, str):
        return yaml.safe_load(Path(spec).read_text()) or {}
    return dict(spec or {})


def link_kwargs(spec: dict | str | None, defaults: dict[str, str]) -> dict[str, dict]:
    """Mininet link kwargs per link class: its default preset with the overrides `spec` gives."""
    given = load(spec)
    if unknown := sorted(set(given) - set(defaults)):
        raise ValueError(f"links: unknown link class(es) {unknown}; valid: {sorted(defaults)}")
    out = {}
    for cls, name in defaults.items():
        over = given.get(cls) or {}
        over = {"preset": over} if isinstance(over, str) else dict(over)
        out[cls] = preset(over.pop("preset", name), **over).to_mininet()
    return out
