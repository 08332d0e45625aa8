"""The text of a recipe's ``data.source``: a Hugging Face hub dataset or local files, read
with ``datasets`` into one dataset per split — stored (``pipeline.prepare``) or streamed
(``pipeline.streaming``), by the same rules.

Local files: ``data.source.dir`` holds one file per split, named ``train``, ``valid`` /
``validation`` / ``val`` and ``test``; or ``data.source.files`` lists them per split. Each
split's files are of one format: ``.txt`` (lines, or blank-line separated paragraphs),
``.jsonl`` / ``.json``, ``.csv`` or ``.parquet``. A hub dataset's splits are matched to the
same names.

``datasets`` is imported when a split is loaded, not with this module.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import SPLITS, DataConfig
from pipeline.errors import UserError

# a split's accepted names, in order of preference (a file's stem, or a hub split's name)
SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_TEXT_FORMATS = {"text", "json", "csv"}  # read as UTF-8 text: validated before loading


@dataclass
class LocalSplit:
    """One split's local files.

    Attributes:
        builder: the ``datasets`` packaged builder that reads them: text | json | csv | parquet.
        files: the files, in order.
    """

    builder: str
    files: list[Path]

    @property
    def is_text(self) -> bool:
        """Whether the files are read as UTF-8 text (so can be checked for it): not parquet."""
        return self.builder in _TEXT_FORMATS


def local_splits(cfg: DataConfig) -> dict[str, LocalSplit]:
    """Each split's files, from ``data.source.dir`` or ``data.source.files``, checked.

    Args:
        cfg: the ``data:`` section; its source is local (``dir`` or ``files``).

    Returns:
        ``{split: LocalSplit}`` for the splits that have files; ``train`` is always there.

    Raises:
        UserError: a missing or unreadable folder or file, no train file, two files for a
            split, a file listed twice, an empty split, an unsupported or mixed format.
    """
    src = cfg.source
    found: dict[str, list[Path]] = {}
    if src.dir is not None:
        if not src.dir.is_dir():
            raise UserError(f"data.source.dir: no such folder: {src.dir}")
        try:
            listing = sorted(src.dir.iterdir())
        except OSError as e:
            raise UserError(f"data.source.dir: cannot read {src.dir} ({e.strerror})") from None
        for split, stems in SPLIT_STEMS.items():
            hits = [p for p in listing if p.is_file() and p.stem in stems and p.suffix in _BUILDERS]
            if len(hits) > 1:
                raise UserError(f"{src.dir}: more than one {split} file ({', '.join(p.name for p in hits)})")
            if hits:
                found[split] = hits
        if "train" not in found:
            raise UserError(
                f"{src.dir}: no train file (expected train.txt, .jsonl, .json, .csv or .parquet; "
                f"found {', '.join(p.name for p in listing) or 'nothing'})"
            )
    else:
        seen: dict[Path, str] = {}
        for split in SPLITS:
            files = getattr(src.files, split)
            for f in files:
                if not f.is_file():
                    raise UserError(f"data.source.files.{split}: no such file: {f}")
                real = f.resolve()
                if real in seen:  # the same text twice would silently weigh it double (or leak it into evaluation)
                    where = f"twice in data.source.files.{split}" if seen[real] == split else \
                        f"in data.source.files.{seen[real]} and data.source.files.{split}"
                    raise UserError(f"{f} is listed {where}; list each file once")
                seen[real] = split
            if files:
                found[split] = files
    out = {}
    for split, files in found.items():
        if all(f.stat().st_size == 0 for f in files):  # datasets' own message for this is cryptic
            raise UserError(f"empty corpus: the {split} split's {'files are' if len(files) > 1 else 'file is'} empty ({', '.join(map(str, files))})")
        kinds = {_BUILDERS.get(f.suffix) for f in files}
        if None in kinds:
            bad = next(f for f in files if f.suffix not in _BUILDERS)
            raise UserError(f"{bad}: unsupported file type {bad.suffix!r} (use .txt, .jsonl, .json, .csv or .parquet)")
        if len(kinds) > 1:
            raise UserError(f"data.source: the {split} files mix formats ({', '.join(sorted(kinds))})")
        out[split] = LocalSplit(kinds.pop(), files)
    return out


def check_hub(repo: str) -> None:
    """Fail fast, with a way out, when the hub cannot be reached.

    Args:
        repo: the hub dataset about to be loaded (named in the message).

    Raises:
        UserError: ``HF_HUB_OFFLINE`` is set, or the hub's host (``HF_ENDPOINT``) does not
            answer within 5 s; the message says how to use local files instead.
    """
    how = (
        "Without hub access, use local files: data.source.dir=FOLDER (holding train.txt, valid.txt, test.txt) "
        "or data.source.files.train=FILE"
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"HF_HUB_OFFLINE is set, so {repo} cannot be downloaded. {how}")
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face hub ({host}: {e.strerror or e}) to load {repo}. {how}") from None


def text_units(text: str, mode: str) -> list[str]:
    """The rows :func:`load_splits` makes of a text file's contents, for text that is not in
    a file (``lm.evaluate --file``): one per line (``mode="line"``, blank lines included)
    or per ``\\n\\n``-separated paragraph (``"document"``, empty ones dropped).

    Exactly what ``datasets``' text builder does: the file opened in text mode turns
    ``\\r\\n`` and ``\\r`` into ``\\n`` (universal newlines), and only ``\\n`` ends a line —
    not the other breaks ``str.splitlines`` knows (``\\x0c``, ``\\x85``, ``\\u2028``, ...).
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if mode == "line":
        lines = text.split("\n")
        return lines[:-1] if lines[-1] == "" else lines  # a final "\n" ends the last line, starts none
    return [p for p in text.split("\n\n") if p]


def load_splits(cfg: DataConfig, *, local: dict[str, LocalSplit] | None = None, cache_dir: Path | None = None,
                streaming: bool = False) -> dict:
    """Each split of the source as a ``datasets`` dataset, read as ``cfg`` says.

    Text files are read as ``utf-8-sig`` (a BOM dropped), with ``data.errors`` for invalid
    UTF-8, one row per line (``data.mode: line``) or per paragraph (``document``).

    Args:
        cfg: the ``data:`` section.
        local: the local splits as :func:`local_splits` gave them (``None``: listed here);
            unused for a hub source.
        cache_dir: where the splits read from local files are written (required unless
            ``streaming``); a hub download goes to the user's Hugging Face cache.
        streaming: ``IterableDataset`` splits read as they are iterated, nothing written;
            else memory-mapped ``Dataset`` splits.

    Returns:
        ``{split: dataset}`` for the splits the source has; ``train`` is always there.

    Raises:
        UserError: the hub unreachable or the dataset unloadable, no train split, a file
            ``datasets`` cannot parse.
    """
    import datasets

    if cfg.source.hub:
        return _hub_splits(cfg, streaming)
    if cache_dir is None and not streaming:
        raise ValueError("load_splits: give cache_dir, the folder the splits are written to")
    errors = "replace" if cfg.errors == "replace" else "strict"
    out = {}
    for split, src in (local_splits(cfg) if local is None else local).items():
        if not streaming and src.builder == "text" and cfg.mode == "line" and errors == "strict":
            # the lines datasets' text loader gives, split in Arrow kernels (pipeline/fast_word.py)
            from pipeline import fast_word

            cache_dir.mkdir(parents=True, exist_ok=True)
            out[split] = fast_word.load_text_lines(src.files, cache_dir / f"lines-{split}.arrow")
            continue
        kwargs: dict = {}
        if src.builder == "text":
            kwargs = {"encoding": "utf-8-sig", "encoding_errors": errors, "sample_by": "line" if cfg.mode == "line" else "paragraph"}
        elif src.builder in ("csv", "json"):
            kwargs = {"encoding": "utf-8-sig", "encoding_errors": errors}
        if cache_dir is not None:
            kwargs["cache_dir"] = str(cache_dir)
        try:
            out[split] = datasets.load_dataset(src.builder, data_files={split: [str(f) for f in src.files]}, split=split,
                                               streaming=streaming, **kwargs)
        except Exception as e:  # malformed json/csv/parquet: datasets wraps the parser's error
            cause = e.__cause__ or e
            raise UserError(f"could not read {', '.join(map(str, src.files))}: {str(cause).splitlines()[0]}") from None
    return out


def _hub_splits(cfg: DataConfig, streaming: bool) -> dict:
    import datasets

    src = cfg.source
    check_hub(src.hub)
    try:
        # the hub download goes to the user's HF cache, so the next build does not fetch it again
        dd = datasets.load_dataset(src.hub, src.name, revision=src.revision, streaming=streaming)
    except Exception as e:  # the hub raises many types; all mean "could not load"
        raise UserError(f"could not {'stream' if streaming else 'load'} {src.hub} ({src.name}): {str(e).splitlines()[0]}") from None
    out = {}
    for split, stems in SPLIT_STEMS.items():
        name = next((s for s in stems if s in dd), None)
        if name:
            out[split] = dd[name]
    if "train" not in out:
        raise UserError(f"{src.hub} has no train split (has: {', '.join(dd)})")
    return out
