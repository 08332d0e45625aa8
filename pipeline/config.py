"""Recipes: one YAML file per experiment, validated into dataclasses.

A recipe's ``data:`` section drives ``pipeline.prepare``; its ``model:`` and ``train:``
sections drive ``lm.train`` (see ``lm/config.py``). The rules, shared by both:

* YAML is read with ``yaml.safe_load`` — a recipe can never construct Python objects.
* ``key=value`` overrides after the recipe path use dotted names
  (``data.max_len=128``); the value is parsed to the field's declared type.
* Unknown keys fail, naming the closest valid key; wrong types fail, naming key,
  value and expected type. Values are validated once, in ``__post_init__``.
* Relative paths written in the recipe resolve against the recipe file's folder;
  relative paths given as overrides resolve against the current directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError

PATH = {"path": True}  # field metadata: a filesystem path, resolved relative to the recipe


class _Override(str):
    """A value typed on the command line: parsed to the field's type, paths relative to cwd."""


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[dict, Path]:
    """Read a recipe and apply dotted ``key=value`` overrides.

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
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {e.problem or e}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read recipe: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a mapping of sections (data:, model:, train:), got {type(raw).__name__}")
    _source_precedence(raw, [o.partition("=")[0] for o in overrides])
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
        node[leaf] = _Override(value)
    return raw, path.resolve().parent


def _source_precedence(raw: dict, keys: list[str]) -> None:
    """A source chosen on the command line replaces the recipe's: ``data.source.dir=...``
    on a hub recipe means "use these files", not "error: two sources"."""
    chosen = {k.split(".")[2] for k in keys if k.startswith("data.source.") and k.count(".") >= 2}
    kinds = {"hub": ("hub", "name", "revision"), "dir": ("dir",), "files": ("files",)}
    if not chosen & kinds.keys():
        return
    data = raw.get("data")
    source = data.get("source") if isinstance(data, dict) else None
    if isinstance(source, dict):
        for kind, names in kinds.items():
            if kind not in chosen:
                for n in names:
                    if n not in chosen:
                        source.pop(n, None)


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
        return _coerce(value, tp, base_dir if not isinstance(value, _Override) else Path.cwd(), is_path)
    except (ValueError, TypeError):
        shown = str(value) if isinstance(value, _Override) else repr(value)
        raise UserError(f"{key}={shown}: expected {_type_name(tp)}") from None


def _coerce(value: Any, tp: Any, base_dir: Path, is_path: bool) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    from_cli = isinstance(value, _Override)
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
            value = yaml.safe_load(value)
            value = value if isinstance(value, list) else [value]
            value = [_Override(v) if isinstance(v, str) else v for v in value]
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


# --------------------------------------------------------------------------- the data section


SPLITS = ("train", "validation", "test")
TOKENIZER_KINDS = ("word", "bpe", "bytelevel", "unigram", "char")


@dataclass
class SplitFiles:
    """Explicit files per split (``data.source.files.train: [a.txt, b.txt]``)."""

    train: list[Path] = field(default_factory=list, metadata=PATH)
    validation: list[Path] = field(default_factory=list, metadata=PATH)
    test: list[Path] = field(default_factory=list, metadata=PATH)


@dataclass
class SourceConfig:
    """Where the text comes from: exactly one of ``hub``, ``dir`` or ``files``.

    ``dir`` holds per-split files named ``train``, ``valid`` or ``validation``, and
    ``test``, ending in ``.txt``, ``.jsonl``/``.json``, ``.csv`` or ``.parquet``.
    """

    hub: str | None = None  # e.g. Salesforce/wikitext
    name: str | None = None  # the hub dataset's config, e.g. wikitext-2-v1
    revision: str | None = None
    dir: Path | None = field(default=None, metadata=PATH)
    files: SplitFiles = field(default_factory=SplitFiles)

    def __post_init__(self) -> None:
        given = [n for n, v in (("hub", self.hub), ("dir", self.dir), ("files", self.files.train)) if v]
        if len(given) != 1:
            raise ValueError(f"hub|dir|files.train: set exactly one of them (got: {', '.join(given) or 'none'})")


@dataclass
class TokenizerConfig:
    """A tokenizer trained on the train split, or loaded from ``path``.

    Kinds: ``word`` (whitespace-separated words), ``bpe`` (BPE over whitespace/punctuation
    pre-tokens), ``bytelevel`` (GPT-2 style byte-level BPE, no unknown tokens),
    ``unigram`` (SentencePiece-style), ``char`` (one token per character, spaces included).
    ``vocab_size`` counts the special tokens; ``None`` keeps every type (word, char) or
    means 8,000 (subword kinds).
    """

    kind: Literal["word", "bpe", "bytelevel", "unigram", "char"] = "word"
    path: Path | None = field(default=None, metadata=PATH)
    vocab_size: int | None = None
    min_frequency: int = 1
    lowercase: bool = False
    nfkc: bool = False

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 8:
            raise ValueError(f"vocab_size={self.vocab_size}: too small (at least 8)")
        if self.min_frequency < 1:
            raise ValueError(f"min_frequency={self.min_frequency}: must be >= 1")


@dataclass
class StreamConfig:
    """``data.stream``: train from the source read with ``streaming=True``, no prepared copy.

    The text is encoded on the fly (``pipeline.streaming.open_stream``) with
    ``data.tokenizer.path``, or with a ``data.tokenizer`` trained first on the first
    ``sample_lines`` lines of train; batches come from ``StreamBucketBatcher`` holding
    ``buffer_size`` rows. ``pipeline.prepare`` ignores this section.
    """

    enabled: bool = False
    buffer_size: int = 10_000
    sample_lines: int = 100_000

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.sample_lines < 1:
            raise ValueError(f"buffer_size={self.buffer_size}, sample_lines={self.sample_lines}: both must be >= 1")


@dataclass
class DataConfig:
    """The ``data:`` section: source → tokenizer → ids → Arrow files in ``output``.

    ``mode``: ``line`` — every line is a sequence, empty lines included (the WikiText
    convention, which keeps the published token counts); ``document`` — blank-line
    separated paragraphs.

    ``max_len`` caps the ids per stored sequence (``<bos>`` and ``<eos>`` included);
    ``overflow`` says what happens to longer ones: ``split`` into windows whose first
    input is the previous window's last token (the predicted tokens are unchanged),
    ``truncate`` (keep the first ``max_len`` ids), or ``drop``.

    A missing validation split is made by holding out ``holdout`` of train (a seeded
    random subset of sequences); a missing test split is simply absent, and the trainer
    then reports no test perplexity.
    """

    source: SourceConfig = field(default_factory=SourceConfig)
    output: Path = field(default=Path("prepared"), metadata=PATH)
    text_column: str = "text"
    mode: Literal["line", "document"] = "line"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    max_len: int | None = None
    overflow: Literal["split", "truncate", "drop"] = "split"
    errors: Literal["strict", "replace"] = "strict"
    holdout: float = 0.05
    seed: int = 0
    num_proc: int = 1
    batch_size: int = 1000
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len={self.max_len}: a sequence needs at least 2 ids (<bos> and one predicted token)")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout}: must be between 0 and 1")
        if self.num_proc < 1 or self.batch_size < 1:
            raise ValueError(f"num_proc={self.num_proc}, batch_size={self.batch_size}: both must be >= 1")


@dataclass
class DataRecipe:
    """A recipe as ``pipeline.prepare`` sees it: only ``data:`` is read here."""

    data: DataConfig = field(default_factory=DataConfig)


def load_data_config(path: str | Path, overrides: list[str] = ()) -> DataConfig:
    """The validated ``data:`` section of a recipe (other sections belong to the trainer)."""
    raw, base_dir = load_recipe(path, overrides)
    for item in overrides:
        if not item.startswith("data."):
            raise UserError(f"override {item.split('=')[0]}: pipeline.prepare only reads data.* keys")
    if "data" not in raw:
        raise UserError(f"{path}: the recipe has no data: section")
    return from_dict(DataConfig, raw["data"], "data", base_dir, root=DataRecipe)
