"""Split-learning schemes: one file, one class each; importing this package registers them all."""

import importlib
import pkgutil

from nodes.imports import is_reference, resolve
from nodes.schemes.base import REGISTRY, Scheme

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def get_scheme(name: str, **options) -> Scheme:
    """A scheme by its registered name, or the user's own by reference (pkg.module:MyScheme or
    path/to/file.py:MyScheme, a subclass of nodes.schemes.base.Scheme)."""
    if is_reference(name):
        cls = resolve(name, "scheme")
        if not (isinstance(cls, type) and issubclass(cls, Scheme)):
            raise ValueError(f"scheme {name!r}: {cls!r} is not a subclass of "
                             f"nodes.schemes.base.Scheme")
        return cls(**options)
    if name not in REGISTRY:
        raise ValueError(f"scheme {name!r} is unknown; valid: {sorted(REGISTRY)} or your own "
                         f"as pkg.module:MyScheme")
    return REGISTRY[name](**options)


__all__ = ["REGISTRY", "Scheme", "get_scheme"]
