"""Finding an algorithm by name, without importing any other.

fedge's own algorithm ``foo`` is declared in ``algorithms/foo.py``; a third-party package adds one
through the ``fedge.algorithms`` entry-point group (``foo = "my_pkg.foo:FooConfig"``), pointing at
a pydantic model whose ``name`` field defaults to ``"foo"``. The model names its server factory
and client trainer as ``"module:attribute"`` strings (see ``algorithms/base.py``), which
:func:`load_object` imports when a run needs them. The lookups are by name at run time: the
schema depends on no algorithm, and a run imports only its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel

ENTRY_POINT_GROUP = "fedge.algorithms"
BUILTIN_PACKAGE = "algorithms"  # fedge's own declarations: one module per algorithm


class UnknownAlgorithm(ValueError):
    """No algorithm of that name is declared by fedge or by an installed plug-in."""


def load_object(dotted: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attr = dotted.partition(":")
    if not attr:
        raise ValueError(f"{dotted!r} must look like 'package.module:attribute'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot load {dotted!r}: {err}") from err


def _declared_in(module: Any, name: str) -> type[BaseModel] | None:
    for obj in vars(module).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, BaseModel)
            and obj.__module__ == module.__name__
            and "name" in obj.model_fields
            and obj.model_fields["name"].default == name
        ):
            return obj
    return None


def _builtin_modules() -> list[str]:
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    paths = list(spec.submodule_search_locations or []) if spec else []
    return sorted(m.name for m in pkgutil.iter_modules(paths) if not m.name.startswith("_"))


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


@cache
def algorithm_config(name: str) -> type[BaseModel]:
    """The declaration (hyperparameter model) of algorithm ``name``; imports only that one."""
    if name in _builtin_modules():
        found = _declared_in(importlib.import_module(f"{BUILTIN_PACKAGE}.{name}"), name)
        if found is not None:
            return found
    plugin = _plugins().get(name)
    if plugin is not None:
        cls = plugin.load()
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise UnknownAlgorithm(
                f"entry point {name!r} in group {ENTRY_POINT_GROUP!r} ({plugin.value}) must name a "
                "pydantic model (a subclass of algorithms.base.AlgorithmConfig)"
            )
        if cls.model_fields.get("name") is None or cls.model_fields["name"].default != name:
            raise UnknownAlgorithm(
                f"entry point {name!r} ({plugin.value}): its `name` field must default to {name!r}"
            )
        return cls
    raise UnknownAlgorithm(f"unknown algorithm {name!r}; allowed: {', '.join(algorithm_names())}")


@cache
def algorithm_names() -> tuple[str, ...]:
    """Every algorithm fedge and the installed plug-ins declare (imports them all: for listings
    and error messages, never on a run's path)."""
    names = {
        m
        for m in _builtin_modules()
        if _declared_in(importlib.import_module(f"{BUILTIN_PACKAGE}.{m}"), m) is not None
    }
    return tuple(sorted(names | set(_plugins())))
