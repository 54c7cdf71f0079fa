"""Policy objectives, one file each: ``from duca_fast.ops import objectives``.

Every module of this package that defines an ``Objective`` subclass decorated with ``@register`` is
imported below, so adding an objective is adding one file (and its tests). ``resolve`` turns the spec
string the custom ops carry (``"gspo"``, ``"sapo:tau_pos=1.0,tau_neg=1.05"``) into an instance with the
options' clip values filled in where the objective inherits them.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import pkgutil

from duca_fast.ops.policy_loss.objectives.base import Objective, ObjectiveBatch, ObjectiveTerms

OBJECTIVES: dict[str, type[Objective]] = {}
"""Registered objectives by name (lowercase, verl's name where verl has the loss)."""


def register(cls: type[Objective]) -> type[Objective]:
    if not cls.name or cls.name in OBJECTIVES:
        raise ValueError(f"objective name {cls.name!r} is empty or taken")
    OBJECTIVES[cls.name] = cls
    return cls


def as_spec(objective: str | Objective | None) -> str:
    """The spec string of an objective instance or name (None: "ppo_clip")."""
    if objective is None:
        return "ppo_clip"
    if isinstance(objective, Objective):
        return objective.spec()
    if isinstance(objective, str):
        return objective
    raise ValueError(f"objective must be a name or an objectives.* instance, got {type(objective).__name__}")


@functools.lru_cache(maxsize=256)
def parse(spec: str) -> Objective:
    """``name`` or ``name:field=value,...`` -> the objective (inherited fields still None)."""
    name, _, arguments = spec.partition(":")
    name = name.strip().lower()
    if name not in OBJECTIVES:
        raise ValueError(f"objective {name!r} is not one of {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    known = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for item in filter(None, (part.strip() for part in arguments.split(","))):
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or key not in known:
            fields_list = ", ".join(sorted(known))
            raise ValueError(f"objective {name!r}: {item!r} is not one of its fields ({fields_list})")
        try:
            values[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError) as error:
            raise ValueError(f"objective {name!r}: {key}={text.strip()!r} is not a literal") from error
    return cls(**values)


@functools.lru_cache(maxsize=256)
def resolve(spec: str, clip_low: float, clip_high: float, dual_clip: float | None) -> Objective:
    """The objective of ``spec`` with its inherited fields taken from the options, validated."""
    objective = parse(spec)
    given = {"clip_low": clip_low, "clip_high": clip_high, "dual_clip": dual_clip}
    filled = {
        name: given[name] for name in objective.inherits if getattr(objective, name) is None and name in given
    }
    objective = dataclasses.replace(objective, **filled) if filled else objective
    objective.validate()
    return objective


def _import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        if module.name != "base":
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()


__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveBatch",
    "ObjectiveTerms",
    "as_spec",
    "parse",
    "register",
    "resolve",
]


def __getattr__(name: str) -> type[Objective]:
    """``objectives.GSPO`` and the like: every registered class by its class name (no list to keep)."""
    for cls in OBJECTIVES.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *(cls.__name__ for cls in OBJECTIVES.values())])
