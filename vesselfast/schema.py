"""Config keys declared once: each dataclass field carries its type (the annotation) and its range (the
field's metadata, written with :func:`option`), and two generic functions read them for every key:
:func:`coerce` turns a value from YAML or ``--set`` into the declared type, :func:`check` refuses a value
outside the declared range. Floats must also be finite. Checks that relate two keys (a step count no
larger than ``diffusion.T``, say) stay with the config (vesselfast/pipeline/config.py, ``validate``).

    lr: float = option(2e-4, gt=0)
    channels: List[int] = option(factory=lambda: [16, 32], nonempty=True, ge=1, what="channel counts")
"""
from __future__ import annotations

import collections.abc
import dataclasses
import math
import typing
from typing import Any, Dict, Optional

from vesselfast.errors import UserError

_BOUNDS = ("ge", "gt", "le", "lt")


def option(default: Any = dataclasses.MISSING, *, factory=None, ge=None, gt=None, le=None, lt=None, choices=None,
           nonempty: bool = False, what: str = "", hint: str = ""):
    """A dataclass field with its checks. ``ge``/``gt``/``le``/``lt``: bounds (for a list: of every item);
    ``choices``: the allowed values (or a function returning them, read when checked); ``nonempty``: a
    list needs an item; ``what``: a list's items in words; ``hint``: text added to the message."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt, choices=choices, nonempty=nonempty, what=what,
                                  hint=hint).items() if v is not None and v is not False and v != ""}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls, name: str):
    """The declaration (metadata) of the field ``name`` of the dataclass ``cls``, for code that needs a
    key's bound, e.g. ``declared(DataConfig, "crop")["ge"]``."""
    return next(f.metadata for f in dataclasses.fields(cls) if f.name == name)


# -- types --------------------------------------------------------------------------------------------
class _Mismatch(Exception):
    pass


def _scalar(value, tp):
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. segmenter.vessel_prior=0.07: the config's validate() checks what it allows
    else:
        return value
    raise _Mismatch


def _unwrap(tp):
    """(type without Optional, whether None is allowed)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _item_type(tp) -> Optional[type]:
    """X for List[X] / Sequence[X], else None."""
    if typing.get_origin(tp) in (list, tuple, collections.abc.Sequence):
        return typing.get_args(tp)[0]
    return None


def _name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def field_types(cls) -> Dict[str, Any]:
    """The declared type of every field of the dataclass ``cls`` (annotations resolved)."""
    return typing.get_type_hints(cls)


def coerce(value, tp, name: str):
    """``value`` as the declared type ``tp`` (bool, int, float, str, a list of one of them, Optional of
    those); a UserError naming the key ``name`` when it is not one."""
    tp, nullable = _unwrap(tp)
    if value is None and nullable:
        return None
    item = _item_type(tp)
    try:
        if item is None:
            return _scalar(value, tp)
        if isinstance(value, str) and item is str:
            return [value]
        if isinstance(value, (list, tuple)):
            return [_scalar(v, item) for v in value]
    except _Mismatch:
        pass
    want = _name(tp) if item is None else f"a list of {_name(item)}"
    raise UserError(f"config key {name!r} expects {want}, got {value!r}")


# -- ranges -------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def describe(meta) -> str:
    """The range of ``meta`` in words: ``> 0``, ``in [0, 1)``, ``>= 16`` ('' without bounds)."""
    lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        return f"in {lo[0]}{_fmt(lo[1])}, {_fmt(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {_fmt(lo[1])}"
    if hi:
        return f"{'<=' if hi[0] == ']' else '<'} {_fmt(hi[1])}"
    return ""


def _in_range(x, meta) -> bool:
    if isinstance(x, float) and not math.isfinite(x):
        return False
    return not (("ge" in meta and not x >= meta["ge"]) or ("gt" in meta and not x > meta["gt"])
                or ("le" in meta and not x <= meta["le"]) or ("lt" in meta and not x < meta["lt"]))


def _choices(meta):
    c = meta.get("choices")
    return tuple(c() if callable(c) else c) if c is not None else None


def _either(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def check_value(name: str, value, meta) -> None:
    """A UserError naming ``name=value`` when ``value`` lies outside the declaration ``meta``."""
    hint, desc = meta.get("hint", ""), describe(meta)
    if isinstance(value, list):
        if (meta.get("nonempty") and not value) or not all(_in_range(v, meta) for v in value):
            what = " ".join(w for w in ("a non-empty list" if meta.get("nonempty") else "a list", "of",
                                        meta.get("what", "values"), desc) if w)
            raise UserError(f"{name}={value!r}: give {what}{hint}")
        return
    if value is None:
        return
    choices = _choices(meta)
    if choices is not None and value not in choices:
        raise UserError(f"{name}={value!r}: use {_either(choices)}{hint}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{name}={value} must be a finite number{' ' + desc if desc else ''}{hint}")
    if not _in_range(value, meta):
        raise UserError(f"{name}={value} must {'lie' if desc.startswith('in') else 'be'} {desc}{hint}")


def check(obj, where: str = "") -> None:
    """Every key of the (nested) dataclass instance ``obj`` against its declaration, in field order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            check(value, f"{where}{f.name}.")
        else:
            check_value(f"{where}{f.name}", value, f.metadata)
