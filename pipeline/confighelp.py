"""Recipe keys as help text, generated from the config dataclasses so it cannot drift.

Every key a recipe accepts is a dataclass field (``pipeline/config.py``,
``lm/config.py``); its type and default come from the field, its one-line doc from the
``Attributes:`` section of the class docstring (Google style)::

    Attributes:
        max_len: ids per stored sequence at most (<bos> and <eos> included); null = no cap.

``python -m lm.train --help`` and ``python -m pipeline.prepare --help`` print
:func:`recipe_help`; a test checks every field has its line.
"""
from __future__ import annotations

import dataclasses
import inspect
import re
import textwrap
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass
class KeyDoc:
    """One recipe key: ``key`` (dotted), ``type`` and ``default`` as a user writes them, ``doc``."""

    key: str
    type: str
    default: str
    doc: str


def attribute_docs(cls: type) -> dict[str, str]:
    """The ``Attributes:`` entries of a class docstring: ``{name: one-line doc}``.

    Continuation lines (indented deeper than the name) join the entry with single spaces.
    """
    lines = (inspect.getdoc(cls) or "").splitlines()
    docs: dict[str, str] = {}
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return docs
    name = None
    for line in lines[start:]:
        if line and not line.startswith(" "):  # the next section
            break
        m = re.match(r"^ {4}(\w+)(?: \([^)]*\))?: ?(.*)$", line)
        if m:
            name = m.group(1)
            docs[name] = m.group(2).strip()
        elif name and line.strip():
            docs[name] = f"{docs[name]} {line.strip()}".strip()
    return docs


def summary(cls: type) -> str:
    """The class docstring without its ``Attributes:`` section (the section's prose)."""
    doc = inspect.getdoc(cls) or ""
    return doc.split("\nAttributes:", 1)[0].strip()


def type_name(tp: Any) -> str:
    """A field type as a recipe writer reads it: ``int | null``, ``'lstm' | 'gru'``, ``list[path]``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if args:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if tp is type(None):
        return "null"
    return "path" if tp is Path else getattr(tp, "__name__", str(tp))


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def describe(cls: type, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of dataclass ``cls`` (nested sections walked depth first), in field order.

    Args:
        cls: a config dataclass (``DataConfig``, ``Recipe``, ...).
        prefix: the dotted section name the keys live under (``"data."``).

    Returns:
        One :class:`KeyDoc` per leaf key; ``doc`` is ``""`` where the class documents none.
    """
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out.append(KeyDoc(f"{prefix}{f.name}", type_name(tp), _yaml_value(default), docs.get(f.name, "")))
    return out


def sections(cls: type, prefix: str = "") -> list[tuple[str, type]]:
    """``(dotted name, dataclass)`` of ``cls``'s sections and their subsections, depth first."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            name = f"{prefix}{f.name}"
            out.append((name, hints[f.name]))
            out += sections(hints[f.name], name + ".")
    return out


def recipe_help(cls: type, width: int = 88) -> str:
    """Help text for every section and key of recipe dataclass ``cls``.

    Per section: its name, its class and module (where it is documented), its prose; then
    per key ``key = default  (type)`` and the key's doc, wrapped to ``width``.
    """
    parts = []
    for name, sec in sections(cls):
        own = [k for k in describe(sec, name + ".") if k.key.rpartition(".")[0] == name]
        if not own:
            continue
        where = f"{sec.__module__.replace('.', '/')}.py {sec.__name__}"
        text = summary(sec).replace("``", "")
        parts.append(f"{name}:  ({where})")
        if text:
            parts.append(textwrap.indent(text, "  ") + "\n")
        for k in own:
            parts.append(f"  {k.key} = {k.default}  ({k.type})")
            if k.doc:
                parts.append(textwrap.fill(k.doc.replace("``", ""), width, initial_indent=" " * 6,
                                           subsequent_indent=" " * 6))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"
