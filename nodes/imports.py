"""A researcher's own code named by reference: `pkg.module:attr` or `path/to/file.py:attr`.

Models, data sets and schemes may be given this way instead of a built-in name
(nodes.models, nodes.data, nodes.schemes); the controller and every node process import the
same reference, so a user's code needs no edit inside sledge. A file path is made absolute by
the controller's config (nodes may run in another folder). Errors name the reference and what
is wrong with it. It imports; it does not check what it imported (the callers do).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any


def is_reference(name: Any) -> bool:
    """Whether `name` names code (has a ':' before an attribute) rather than a built-in."""
    return isinstance(name, str) and ":" in name and not name.endswith(":")


def absolute(ref: str) -> str:
    """The reference with a relative file path made absolute (a module path as it is)."""
    where, _, attr = ref.rpartition(":")
    if where.endswith(".py") and not os.path.isabs(where):
        return f"{os.path.abspath(where)}:{attr}"
    return ref


def resolve(ref: str, what: str) -> Any:
    """The object `ref` names; `what` says what it should be, for the error message."""
    where, _, attr = ref.rpartition(":")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ImportError(f"no such file {where!r}")
            name = "sledge_user_" + hashlib.sha1(os.path.abspath(where).encode()).hexdigest()[:12]
            module = sys.modules.get(name)
            if module is None:  # once per process: the same classes for every caller
                spec = importlib.util.spec_from_file_location(name, where)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
        else:
            module = importlib.import_module(where)
    except Exception as e:
        raise ValueError(f"{what} {ref!r}: cannot import {where!r}: "
                         f"{type(e).__name__}: {e}") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {ref!r}: {where!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj
