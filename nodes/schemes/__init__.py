"""Split-learning schemes: one file, one class each; importing this package registers them all."""

import importlib
import pkgutil

from nodes.schemes.base import REGISTRY, Scheme

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def get_scheme(name: str, **options) -> Scheme:
    if name not in REGISTRY:
        raise ValueError(f"scheme {name!r} is unknown; valid: {sorted(REGISTRY)}")
    return REGISTRY[name](**options)


__all__ = ["REGISTRY", "Scheme", "get_scheme"]
