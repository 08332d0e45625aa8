"""Recipes as typed YAML: a YAML file, dotted ``key=value`` overrides, validated into dataclasses.

The rules, the same for every section of a recipe (the sections themselves, the schema,
are ``pipeline/config.py`` for ``data:`` and ``lm/config.py`` for ``model:`` / ``train:``):

* YAML is read with ``yaml.SafeLoader`` (plus ``1e-3`` as a float) — a recipe can never construct Python objects.
* ``key=value`` overrides after the recipe path use dotted names
  (``data.max_len=128``); the value is parsed to the field's declared type.
* Unknown keys fail, naming the closest valid key; wrong types fail, naming key,
  value and expected type. Every number is checked generically against its field's
  :func:`num` range (finite, ``>= 0`` by default); rules across keys run in
  ``__post_init__``.
* ``1e-3`` in a recipe is a float, as in YAML 1.2 (PyYAML alone reads it as a string).
* Relative paths written in the recipe resolve against the recipe file's folder;
  relative paths given as overrides resolve against the current directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError

PATH = {"path": True}  # field metadata: a filesystem path, resolved relative to the recipe
INT_MAX = 2**31 - 1  # default ceiling of an int key (beyond it: a typo, or a tensor no kernel takes)
FLOAT_MAX = 1e12  # default ceiling of a float key


def num(*, ge: float | None = 0, gt: float | None = None, le: float | None = None, lt: float | None = None,
        inf: bool = False) -> dict:
    """Field metadata: the valid range of a numeric key (its list items, for a list).

    Every ``int``/``float`` key is checked by :func:`from_dict`, with or without this:
    floats must be finite (unless ``inf=True``), and values default to ``>= 0`` and
    ``<= INT_MAX`` (ints) or ``<= FLOAT_MAX`` (floats). ``num`` tightens that per key.
    Cross-key rules stay in the dataclass's ``__post_init__``.

    Args:
        ge, gt: lower bound, inclusive / exclusive (``ge=None`` lifts the default 0).
        le, lt: upper bound, inclusive / exclusive (default: the type's ceiling).
        inf: ``+inf`` is allowed (e.g. "no limit").
    """
    return {"range": {"ge": None if gt is not None else ge, "gt": gt, "le": le, "lt": lt, "inf": inf}}


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-3`` as a float: YAML 1.1 (PyYAML) wants a
    dot in a float and makes ``1e-3`` a string; YAML 1.2 and every user mean a number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


class Override(str):
    """A value typed on the command line: parsed to the field's type, paths relative to cwd.

    :func:`read_recipe` puts override values in the raw recipe as ``Override``, so code
    merging other values into it later (``lm.config``'s device profiles) can tell that the
    command line set a key, and leave it."""


# --------------------------------------------------------------------------- loading


def read_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[dict, Path]:
    """Read a recipe and apply dotted ``key=value`` overrides, knowing no section's keys
    (``pipeline.config.load_recipe`` adds the rules of the ``data:`` section).

    Args:
        path: the YAML file.
        overrides: ``["data.max_len=128", ...]``.

    Returns:
        ``(raw, base_dir)``: the nested dict (override values still strings, to be
        parsed by :func:`from_dict`) and the folder relative recipe paths resolve to.

    Raises:
        UserError: missing file, YAML syntax error (with line and column), malformed
            override.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {e.problem or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read recipe: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (data:, model:, train:), got {type(raw).__name__}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not of the form key=value (e.g. data.max_len=128)")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            child = node.get(p)
            if child is None:  # absent, or an empty section (``data:`` with nothing under it)
                child = node[p] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {key}: {p} is a value, not a section")
            node = child
        node[leaf] = Override(value)
    return raw, path.resolve().parent


# --------------------------------------------------------------------------- validation


def field_names(cls: type, prefix: str = "") -> list[str]:
    """All dotted key names a dataclass accepts, nested sections included."""
    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        names.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            names += field_names(hints[f.name], name + ".")
    return names


def from_dict(cls: type, raw: Any, prefix: str, base_dir: Path, root: type | None = None) -> Any:
    """Build dataclass ``cls`` from a recipe section, strictly.

    Args:
        cls: the dataclass of this section.
        raw: the section's mapping (``None`` = all defaults).
        prefix: dotted name of the section, for messages (``"data"``).
        base_dir: folder that relative recipe paths resolve against.
        root: the top-level dataclass, for "did you mean" suggestions across sections.

    Raises:
        UserError: unknown key (with the closest valid key), wrong type, invalid value.
    """
    root = root or cls
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise UserError(f"{prefix} must be a section (a mapping of keys), got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            valid = field_names(root)
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.6)
            hint = f" — did you mean {close[0]}?" if close else ""
            raise UserError(f"unknown key {full}{hint}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, key, base_dir, root)
        else:
            kwargs[name] = _convert(value, tp, key, base_dir, fields[name].metadata.get("path", False))
            _check_range(kwargs[name], fields[name].metadata.get("range", {}), key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"{prefix}.{e}" if prefix else str(e)) from None


def to_dict(obj: Any) -> Any:
    """A dataclass config as plain YAML/JSON-safe data (paths as strings)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _check_range(value: Any, rng: dict, key: str) -> None:
    """The generic numeric check of every key (see :func:`num`): finite, within bounds."""
    if isinstance(value, list):
        for v in value:
            _check_range(v, rng, key)
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    is_float = isinstance(value, float)
    if is_float and (math.isnan(value) or (math.isinf(value) and not (rng.get("inf") and value > 0))):
        raise UserError(f"{key}={value}: must be a finite number{'' if value != value else ' (or inf)' if rng.get('inf') else ''}")
    if is_float and math.isinf(value):
        return
    ge, gt, lt = rng.get("ge", 0), rng.get("gt"), rng.get("lt")
    le = rng.get("le", None)
    if le is None and lt is None:
        le = FLOAT_MAX if is_float else INT_MAX
    rules = [(ge, ">=", value >= ge if ge is not None else True), (gt, ">", value > gt if gt is not None else True),
             (le, "<=", value <= le if le is not None else True), (lt, "<", value < lt if lt is not None else True)]
    broken = [f"{op} {_num(b)}" for b, op, ok in rules if not ok]
    if broken:
        raise UserError(f"{key}={value}: must be {broken[0]}")


def _num(b: float) -> str:
    return f"{b:g}" if isinstance(b, float) else str(b)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    args = typing.get_args(tp)
    if args and typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if args:
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_name(a) for a in args)}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, base_dir: Path, is_path: bool) -> Any:
    """Check (YAML values) or parse (command-line strings) ``value`` against type ``tp``."""
    try:
        return _coerce(value, tp, base_dir if not isinstance(value, Override) else Path.cwd(), is_path)
    except yaml.YAMLError as e:  # a list typed on the command line: train.prompts='[a, b'
        raise UserError(f"{key}={value}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
    except (ValueError, TypeError):
        shown = str(value) if isinstance(value, Override) else repr(value)
        raise UserError(f"{key}={shown}: expected {_type_name(tp)}") from None


def _coerce(value: Any, tp: Any, base_dir: Path, is_path: bool) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    from_cli = isinstance(value, Override)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (from_cli and value.lower() in ("null", "none", "~", ""))):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, base_dir, is_path)
            except (ValueError, TypeError):
                pass
        raise ValueError
    if origin is Literal:
        if value in args:
            return str(value) if from_cli else value
        raise ValueError
    if origin is list:
        if from_cli:
            value = yaml.load(value, Loader=_Loader)
            value = value if isinstance(value, list) else [value]
            value = [Override(v) if isinstance(v, str) else v for v in value]
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, args[0], base_dir, is_path) for v in value]
    if tp is bool:
        if from_cli:
            low = value.lower()
            if low in ("true", "yes", "1", "on"):
                return True
            if low in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if from_cli:
            return int(value.replace("_", ""))
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if from_cli:
            return float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise TypeError
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise TypeError
        p = Path(value).expanduser()
        return Path(os.path.normpath(p if p.is_absolute() else base_dir / p))
    raise TypeError(f"unsupported config type {tp}")
