"""The ``data:`` section of a recipe: the dataclasses ``pipeline.prepare`` and
``pipeline.streaming`` read, and :func:`load_data_config`.

A recipe's ``data:`` section drives ``pipeline.prepare``; its ``model:`` and ``train:``
sections drive ``lm.train`` (see ``lm/config.py``). How a recipe is read, overridden and
validated into these dataclasses, the same for every section, is ``pipeline/typed_yaml.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipeline.errors import UserError
from pipeline.typed_yaml import PATH, from_dict, num, read_recipe


SPLITS = ("train", "validation", "test")
TOKENIZER_KINDS = ("word", "bpe", "bytelevel", "unigram", "char")
Overflow = Literal["split", "truncate", "drop"]  # data.overflow (pipeline.encode.apply_max_len)


@dataclass
class SplitFiles:
    """Explicit files per split (``data.source.files.train: [a.txt, b.txt]``).

    Attributes:
        train: the training text files.
        validation: the validation files (none: held out from train, see data.holdout).
        test: the test files (none: no test perplexity).
    """

    train: list[Path] = field(default_factory=list, metadata=PATH)
    validation: list[Path] = field(default_factory=list, metadata=PATH)
    test: list[Path] = field(default_factory=list, metadata=PATH)


@dataclass
class SourceConfig:
    """Where the text comes from: exactly one of ``hub``, ``dir`` or ``files``.

    ``dir`` holds per-split files named ``train``, ``valid`` or ``validation``, and
    ``test``, ending in ``.txt``, ``.jsonl``/``.json``, ``.csv`` or ``.parquet``.

    Attributes:
        hub: a Hugging Face hub dataset, e.g. Salesforce/wikitext (remote code is never run).
        name: the hub dataset's configuration, e.g. wikitext-2-v1.
        revision: a hub revision (branch, tag or commit) to pin the data to.
        dir: a folder of per-split files (train / valid or validation / test).
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

    Attributes:
        kind: word | bpe | bytelevel | unigram | char (see above).
        path: a tokenizers tokenizer.json to load instead of training one (needs <pad>=0, <bos>, <eos>).
        vocab_size: vocabulary size, special tokens included; null = every type (word, char) or 8,000.
        min_frequency: a type seen fewer times in train is left out of the vocabulary (not for unigram).
        lowercase: lowercase the text before tokenizing.
        nfkc: apply Unicode NFKC normalization before tokenizing.
    """

    kind: Literal["word", "bpe", "bytelevel", "unigram", "char"] = "word"
    path: Path | None = field(default=None, metadata=PATH)
    vocab_size: int | None = field(default=None, metadata=num(le=1 << 24))
    min_frequency: int = field(default=1, metadata=num(ge=1))
    lowercase: bool = False
    nfkc: bool = False

    def __post_init__(self) -> None:
        if self.vocab_size is not None and self.vocab_size < 8:
            raise ValueError(f"vocab_size={self.vocab_size}: too small (at least 8)")


@dataclass
class StreamConfig:
    """``data.stream``: train from the source read with ``streaming=True``, no prepared copy.

    The text is encoded on the fly (``pipeline.streaming.open_stream``) with
    ``data.tokenizer.path``, or with a ``data.tokenizer`` trained first on the first
    ``sample_lines`` lines of train; batches come from ``StreamBucketBatcher`` holding
    ``buffer_size`` rows. ``pipeline.prepare`` ignores this section.

    Attributes:
        enabled: train from the streamed source (no prepared Arrow copy); sequence mode only.
        buffer_size: rows the length-bucketing batcher holds (memory vs. padding efficiency).
        sample_lines: first lines of train a tokenizer is trained on when data.tokenizer.path is unset.
    """

    enabled: bool = False
    buffer_size: int = field(default=10_000, metadata=num(ge=1, le=10**8))
    sample_lines: int = field(default=100_000, metadata=num(ge=1, le=10**9))

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

    Attributes:
        output: the prepared-data folder (Arrow files, tokenizer.json, manifest.json).
        text_column: the text column of json/jsonl/csv/parquet files.
        mode: line (every line a sequence) or document (blank-line separated paragraphs).
        max_len: most ids per stored sequence, <bos> and <eos> included; null = no cap.
        overflow: what a sequence longer than max_len becomes: split, truncate or drop.
        errors: invalid UTF-8 in a text file: strict (an error naming file and line) or replace.
        holdout: fraction of train sequences held out as validation when no validation split exists.
        seed: seed of the holdout's random subset.
        num_proc: processes that encode the text (Dataset.map num_proc).
        batch_size: texts per batch when training the tokenizer and encoding.
        stream: train straight from the source read with streaming=True (see StreamConfig).
    """

    source: SourceConfig = field(default_factory=SourceConfig)
    output: Path = field(default=Path("prepared"), metadata=PATH)
    text_column: str = "text"
    mode: Literal["line", "document"] = "line"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    max_len: int | None = None
    overflow: Overflow = "split"
    errors: Literal["strict", "replace"] = "strict"
    holdout: float = 0.05
    seed: int = field(default=0, metadata=num(le=2**32 - 1))
    num_proc: int = field(default=1, metadata=num(ge=1, le=1024))
    batch_size: int = field(default=1000, metadata=num(ge=1, le=10**7))
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        if self.max_len is not None and self.max_len < 2:
            raise ValueError(f"max_len={self.max_len}: a sequence needs at least 2 ids (<bos> and one predicted token)")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout={self.holdout}: must be between 0 and 1")


@dataclass
class DataRecipe:
    """A recipe as ``pipeline.prepare`` sees it: only ``data:`` is read here."""

    data: DataConfig = field(default_factory=DataConfig)


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] = ()) -> tuple[dict, Path]:
    """:func:`pipeline.typed_yaml.read_recipe`, with the one rule across the ``data:``
    section's keys that overrides need: a source chosen on the command line replaces the
    recipe's.

    Args:
        path: the YAML file.
        overrides: ``["data.max_len=128", ...]``.

    Returns:
        ``(raw, base_dir)``, as :func:`pipeline.typed_yaml.read_recipe` gives them.

    Raises:
        UserError: missing file, YAML syntax error (with line and column), malformed
            override.
    """
    raw, base_dir = read_recipe(path, overrides)
    _source_precedence(raw, [o.partition("=")[0] for o in overrides])
    return raw, base_dir


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


def load_data_config(path: str | Path, overrides: list[str] = ()) -> DataConfig:
    """The validated ``data:`` section of a recipe (other sections belong to the trainer)."""
    raw, base_dir = load_recipe(path, overrides)
    for item in overrides:
        if not item.startswith("data."):
            raise UserError(f"override {item.split('=')[0]}: pipeline.prepare only reads data.* keys")
    if "data" not in raw:
        raise UserError(f"{path}: the recipe has no data: section")
    return from_dict(DataConfig, raw["data"], "data", base_dir, root=DataRecipe)
