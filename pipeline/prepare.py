"""Ingestion: ``python -m pipeline.prepare RECIPE [key=value ...] [--force]``.

source (hub id or local files, through ``datasets``)
  → tokenizer (trained on train, streamed, or loaded; through ``tokenizers``)
  → ``<bos> ids <eos>`` per sequence + a ``length`` column (Arrow kernels and
    ``encode_batch_fast`` on Arrow chunks, ``pipeline/fast_word.py``; ``Dataset.map`` with num_proc > 1)
  → ``data.output/{train,validation,test}/`` (memory-mappable Arrow),
    ``tokenizer.json`` and ``manifest.json``.

The output folder appears atomically: everything is built in a temporary sibling
folder and renamed at the end, so a killed or failed run never leaves a manifest
behind. Re-running with the same data section and unchanged sources is a cache hit.
"""
from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa

from pipeline.config import SPLITS, DataConfig, load_data_config, to_dict
from pipeline.data import MANIFEST, TokenDataset
from pipeline.errors import UserError, cli

FORMAT_VERSION = 1
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3: <pad> = 0 is the notebook's pad id
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "wikitext.yaml"
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "valid", "val"), "test": ("test",)}
_TEXT_FORMATS = {"text", "json", "csv"}  # read as UTF-8 text: validated before loading


# --------------------------------------------------------------------------- sources


@dataclass
class _LocalSplit:
    builder: str  # datasets' packaged builder: text | json | csv | parquet
    files: list[Path]


def _local_splits(cfg: DataConfig) -> dict[str, _LocalSplit]:
    """Map each split to its files, from ``source.dir`` or ``source.files``."""
    src = cfg.source
    found: dict[str, list[Path]] = {}
    if src.dir is not None:
        if not src.dir.is_dir():
            raise UserError(f"data.source.dir: no such folder: {src.dir}")
        for split, stems in _SPLIT_STEMS.items():
            hits = sorted(p for p in src.dir.iterdir() if p.is_file() and p.stem in stems and p.suffix in _BUILDERS)
            if len(hits) > 1:
                raise UserError(f"{src.dir}: more than one {split} file ({', '.join(p.name for p in hits)})")
            if hits:
                found[split] = hits
        if "train" not in found:
            raise UserError(
                f"{src.dir}: no train file (expected train.txt, .jsonl, .json, .csv or .parquet; "
                f"found {', '.join(sorted(p.name for p in src.dir.iterdir())) or 'nothing'})"
            )
    else:
        for split in SPLITS:
            files = getattr(src.files, split)
            for f in files:
                if not f.is_file():
                    raise UserError(f"data.source.files.{split}: no such file: {f}")
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
        out[split] = _LocalSplit(kinds.pop(), files)
    return out


def _fingerprint_file(path: Path, validate_utf8: bool) -> dict:
    """sha256 of a source file; in the same pass, check that it decodes as UTF-8."""
    sha = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    ok = True
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            sha.update(block)
            if validate_utf8 and ok:
                try:
                    decoder.decode(block)
                except UnicodeDecodeError:
                    ok = False
    if validate_utf8 and ok:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            ok = False
    if not ok:
        raise UserError(_describe_bad_utf8(path))
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha.hexdigest()}


def _describe_bad_utf8(path: Path) -> str:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (
                    f"{path}:{lineno}: invalid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                    "fix the file or set data.errors=replace"
                )
    return f"{path}: invalid UTF-8 (truncated multi-byte character at the end); fix the file or set data.errors=replace"


def _check_hub(repo: str) -> None:
    """Fail fast, with a way out, when the hub cannot be reached."""
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


def _load_splits(cfg: DataConfig, local: dict[str, _LocalSplit] | None, cache_dir: Path) -> dict:
    """Load each available split as a ``datasets.Dataset`` (arrow-backed, memory-mapped)."""
    import datasets

    errors = "replace" if cfg.errors == "replace" else "strict"
    out = {}
    if local is None:
        _check_hub(cfg.source.hub)
        try:
            # the hub download goes to the user's HF cache, so the next build does not fetch it again
            dd = datasets.load_dataset(cfg.source.hub, cfg.source.name, revision=cfg.source.revision)
        except Exception as e:  # the hub raises many types; all mean "could not load"
            raise UserError(f"could not load {cfg.source.hub} ({cfg.source.name}): {str(e).splitlines()[0]}") from None
        for split, stems in _SPLIT_STEMS.items():
            name = next((s for s in stems if s in dd), None)
            if name:
                out[split] = dd[name]
        if "train" not in out:
            raise UserError(f"{cfg.source.hub} has no train split (has: {', '.join(dd)})")
        return out
    for split, src in local.items():
        if src.builder == "text" and cfg.mode == "line" and errors == "strict":
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
        try:
            ds = datasets.load_dataset(
                src.builder, data_files={split: [str(f) for f in src.files]}, split=split, cache_dir=str(cache_dir), **kwargs
            )
        except Exception as e:  # malformed json/csv/parquet: datasets wraps the parser's error
            cause = e.__cause__ or e
            raise UserError(f"could not read {', '.join(map(str, src.files))}: {str(cause).splitlines()[0]}") from None
        out[split] = ds
    return out


# --------------------------------------------------------------------------- tokenizer


def _build_tokenizer(cfg: DataConfig, train, text_column: str, quiet: bool = False):
    """Train the configured tokenizer on the train split, streamed in batches, or load one."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tqdm.auto import tqdm

    tc = cfg.tokenizer
    if tc.path is not None:
        if not tc.path.is_file():
            raise UserError(f"data.tokenizer.path: no such file: {tc.path}")
        try:
            tok = Tokenizer.from_file(str(tc.path))
        except Exception as e:
            raise UserError(f"{tc.path}: not a tokenizers tokenizer.json ({e})") from None
        _special_ids(tok, where=str(tc.path))
        return tok

    if tc.kind == "word" and not (tc.nfkc or tc.lowercase):
        # the same tokenizer WordLevelTrainer makes, counted on Arrow buffers (pipeline/fast_word.py)
        from pipeline import fast_word

        counts = fast_word.count_dataset_words(train, text_column)
        words = fast_word.word_vocab(counts, SPECIALS, tc.vocab_size, tc.min_frequency)
        return fast_word.word_tokenizer(words, SPECIALS, unk="<unk>")
    norms = ([normalizers.NFKC()] if tc.nfkc else []) + ([normalizers.Lowercase()] if tc.lowercase else [])
    big = 1 << 30  # "keep every type"
    common = {"min_frequency": tc.min_frequency, "special_tokens": list(SPECIALS), "show_progress": False}
    if tc.kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(vocab_size=tc.vocab_size or big, **common)
    elif tc.kind == "char":
        tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        trainer = trainers.WordLevelTrainer(vocab_size=tc.vocab_size or big, **common)
    elif tc.kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=tc.vocab_size or 8000, **common)
    elif tc.kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=tc.vocab_size or 8000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), **common
        )
    else:  # unigram
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        common.pop("min_frequency")
        trainer = trainers.UnigramTrainer(vocab_size=tc.vocab_size or 8000, unk_token="<unk>", **common)
    if norms:
        tok.normalizer = normalizers.Sequence(norms)

    def batches():
        # streamed from the memory-mapped train split: never one giant Python string
        for start in range(0, len(train), cfg.batch_size):
            yield [t if t is not None else "" for t in train[start : start + cfg.batch_size][text_column]]

    n = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    it = tqdm(batches(), total=n, desc=f"train {tc.kind} tokenizer", unit="batch", disable=True if quiet else None)
    tok.train_from_iterator(it, trainer=trainer, length=len(train))
    if tc.kind in ("word", "char"):
        tok = _renumber_word_level(tok)
    return tok


def _renumber_word_level(tok):
    """Give a trained word-level vocabulary contiguous ids with the specials first.

    ``WordLevelTrainer`` counts a special token that also occurs in the text (WikiText's
    literal ``<unk>``) as a word too, which moves it and leaves a hole in the ids.
    """
    from tokenizers import AddedToken, Tokenizer, models

    vocab = tok.get_vocab(with_added_tokens=False)
    words = sorted((i, w) for w, i in vocab.items() if w not in SPECIALS)
    new = Tokenizer(models.WordLevel({**{s: i for i, s in enumerate(SPECIALS)}, **{w: len(SPECIALS) + k for k, (_, w) in enumerate(words)}}, unk_token="<unk>"))
    new.normalizer, new.pre_tokenizer, new.decoder = tok.normalizer, tok.pre_tokenizer, tok.decoder
    new.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return new


def _special_ids(tok, where: str) -> dict[str, int]:
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    missing = [s for s in ("<pad>", "<bos>", "<eos>") if ids[s] is None]
    if missing:
        raise UserError(f"{where}: the tokenizer lacks the special tokens {', '.join(missing)}")
    if ids["<pad>"] != 0:
        raise UserError(f"{where}: <pad> must have id 0 (it has {ids['<pad>']})")
    if ids["<pad>"] == ids["<eos>"]:
        raise UserError(f"{where}: <pad> and <eos> share id {ids['<pad>']}")
    return ids


# --------------------------------------------------------------------------- encoding


class _Encoder:
    """``Dataset.map`` function: text → ``<bos> ids <eos>`` and its length (picklable for num_proc)."""

    def __init__(self, tokenizer, text_column: str, bos: int, eos: int) -> None:
        self.tokenizer, self.text_column, self.bos, self.eos = tokenizer, text_column, bos, eos

    def __call__(self, batch: dict) -> dict:
        texts = [t if t is not None else "" for t in batch[self.text_column]]
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        ids = [[self.bos, *e.ids, self.eos] for e in encode(texts, add_special_tokens=False)]
        return {"input_ids": ids, "length": [len(x) for x in ids]}


class _Overflow:
    """``Dataset.map`` function applying ``data.overflow`` to rows longer than ``max_len``."""

    def __init__(self, max_len: int, policy: str) -> None:
        self.max_len, self.policy = max_len, policy

    def __call__(self, batch: dict) -> dict:
        m, out = self.max_len, []
        for ids in batch["input_ids"]:
            if len(ids) <= m:
                out.append(ids)
            elif self.policy == "truncate":
                out.append(ids[:m])
            elif self.policy == "split":
                # windows overlap by one id: each window's first input is the previous window's
                # last token, so every token is still predicted exactly once
                out.extend(ids[s : s + m] for s in range(0, len(ids) - 1, m - 1))
        return {"input_ids": out, "length": [len(x) for x in out]}


def _encode(cfg: DataConfig, ds, tokenizer, text_column: str, ids: dict, split: str, dtype: str):
    import datasets

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(dtype)), "length": datasets.Value("int32")})
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(ds) >= cfg.num_proc * cfg.batch_size else None
    from pipeline import fast_word

    if fast_word.WordEncoder.supports(tokenizer) or num_proc is None:
        # word level: split, look up and frame on Arrow buffers, same ids as the tokenizer; else
        # encode_batch_fast on large Arrow chunks, ids straight to numpy (fast_word.py)
        kind = fast_word.WordEncoder if fast_word.WordEncoder.supports(tokenizer) else fast_word.TokenizerEncoder
        encoder = kind(tokenizer, ids["<bos>"], ids["<eos>"])
        folder = Path(ds.cache_files[0]["filename"]).parent if ds.cache_files else Path(tempfile.mkdtemp(prefix="rnnlm-encode-"))
        path = folder / f"encoded-{split}-{os.getpid()}-{time.time_ns()}.arrow"
        enc = fast_word.encode_dataset(ds, text_column, encoder, features, path)
    else:
        enc = ds.map(
            _Encoder(tokenizer, text_column, ids["<bos>"], ids["<eos>"]),
            batched=True,
            batch_size=cfg.batch_size,
            num_proc=num_proc,
            remove_columns=ds.column_names,
            features=features,
            desc=f"encode {split}",
        )
    if split == "train" and not _has_text(enc, ids):
        raise UserError("empty corpus: the train split has no text")  # every row is <bos> <eos>
    over = int((np.asarray(enc.data.column("length")) > cfg.max_len).sum()) if cfg.max_len else 0
    if over:
        enc = enc.map(
            _Overflow(cfg.max_len, cfg.overflow),
            batched=True,
            batch_size=cfg.batch_size,
            num_proc=num_proc,
            features=features,
            desc=f"{cfg.overflow} {split} rows > max_len",
        )
    return enc, over


def _has_text(enc, ids: dict) -> bool:
    """Whether any row holds an id besides its ``<bos>`` and ``<eos>`` (vectorised, over Arrow)."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(enc.data.column("input_ids"))
    return pc.any(pc.invert(pc.is_in(flat, value_set=pa.array([ids["<bos>"], ids["<eos>"]], flat.type)))).as_py() or False


def _split_stats(ds: TokenDataset, unk_id: int | None, overflow: str, over: int) -> dict:
    lengths = ds.lengths
    n_unk = sum(int(np.count_nonzero(v == unk_id)) for v in ds._values) if unk_id is not None else 0
    tokens = ds.num_tokens
    edges = [0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 1 << 62]
    counts = np.histogram(lengths, bins=edges)[0] if len(lengths) else np.zeros(len(edges) - 1)
    pct = {f"p{q}": int(np.percentile(lengths, q, method="lower")) if len(lengths) else 0 for q in (50, 90, 95, 99)}
    return {
        "sequences": int(len(lengths)),
        "tokens": tokens,
        "unk": n_unk,
        "unk_rate": n_unk / tokens if tokens else 0.0,
        "length": {"min": int(lengths.min()) if len(lengths) else 0, **pct, "max": int(lengths.max(initial=0)),
                   "mean": float(lengths.mean()) if len(lengths) else 0.0},
        "length_histogram": {"edges": edges[:-1], "counts": [int(c) for c in counts]},
        "overflow_policy": overflow,
        "split": over if overflow == "split" else 0,
        "truncated": over if overflow == "truncate" else 0,
        "dropped": over if overflow == "drop" else 0,
    }


# --------------------------------------------------------------------------- the stage


def _fingerprint(cfg: DataConfig, sources: list[dict]) -> str:
    data = to_dict(cfg)
    for k in ("output", "num_proc", "batch_size"):  # where and how fast: not what
        data.pop(k)
    blob = json.dumps({"format": FORMAT_VERSION, "data": data, "sources": sources}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(cfg: DataConfig, *, force: bool = False, quiet: bool = False) -> dict:
    """Run the ingestion stage; returns the manifest (read back on a cache hit).

    Args:
        cfg: the recipe's validated ``data:`` section.
        force: rebuild even when the output is up to date.
        quiet: print nothing (progress bars included).

    Raises:
        UserError: any problem with the recipe or the data; nothing is written then.
    """
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    out = cfg.output
    local = None if cfg.source.hub else _local_splits(cfg)
    if local is None:
        sources = [{"hub": cfg.source.hub, "name": cfg.source.name, "revision": cfg.source.revision}]
    else:
        sources = [
            {"split": s, **_fingerprint_file(f, validate_utf8=cfg.errors == "strict" and src.builder in _TEXT_FORMATS)}
            for s, src in local.items()
            for f in src.files
        ]
    if cfg.tokenizer.path is not None and cfg.tokenizer.path.is_file():
        sources.append({"tokenizer": str(cfg.tokenizer.path), "sha256": hashlib.sha256(cfg.tokenizer.path.read_bytes()).hexdigest()})
    fp = _fingerprint(cfg, sources)

    if out.exists():
        old = out / MANIFEST
        if not old.is_file():
            if not out.is_dir() or any(out.iterdir()):
                raise UserError(f"data.output={out} exists and is not a prepared dataset; refusing to overwrite it")
        elif not force:
            try:
                manifest = json.loads(old.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                manifest = {}
            if manifest.get("fingerprint") == fp:
                say(f"cache hit: {out} is up to date (fingerprint {fp}); use --force to rebuild")
                return manifest

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(out)
    tmp.mkdir()
    try:
        manifest = _build(cfg, local, tmp, sources, fp, say, quiet)
        manifest["elapsed_s"] = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(summary_table(manifest), file=sys.stderr)
    return manifest


def _build(cfg: DataConfig, local: dict | None, tmp: Path, sources: list[dict], fp: str, say, quiet: bool) -> dict:
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    cache = tmp / ".cache"
    splits = _load_splits(cfg, local, cache)
    col = cfg.text_column
    for split, ds in splits.items():
        if col not in ds.column_names:
            raise UserError(f"{split} split has no column {col!r} (columns: {', '.join(ds.column_names)}); set data.text_column")
        if getattr(ds.features[col], "dtype", None) not in ("string", "large_string"):
            raise UserError(f"{split} split: column {col!r} holds {ds.features[col]}, not text; set data.text_column")
    if "validation" not in splits:
        n = len(splits["train"])
        if n - math.ceil(cfg.holdout * n) < 1:  # datasets' train_test_split would raise ValueError
            raise UserError(
                f"the train split has {n} sequence{'s' if n != 1 else ''}: too few to hold out data.holdout={cfg.holdout} "
                "as validation; add a validation file (valid.txt) or lower data.holdout"
            )
        parts = splits["train"].train_test_split(test_size=cfg.holdout, seed=cfg.seed)
        splits["train"], splits["validation"] = parts["train"], parts["test"]
        say(f"no validation split: held out {len(splits['validation']):,} train sequences ({cfg.holdout:.0%}, seed {cfg.seed})")

    tokenizer = _build_tokenizer(cfg, splits["train"], col, quiet)
    ids = _special_ids(tokenizer, where="tokenizer")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if max(tokenizer.get_vocab().values()) != vocab_size - 1:  # the embedding is sized by vocab_size
        raise UserError(f"tokenizer ids are not contiguous (max id {max(tokenizer.get_vocab().values())}, {vocab_size} tokens)")
    tokenizer.save(str(tmp / "tokenizer.json"))
    dtype = "uint16" if vocab_size <= 1 << 16 else "int32"

    stats = {}
    for split in SPLITS:
        if split not in splits:
            continue
        enc, over = _encode(cfg, splits[split], tokenizer, col, ids, split, dtype)
        enc.save_to_disk(str(tmp / split))
        stats[split] = _split_stats(TokenDataset(tmp, split), ids["<unk>"], cfg.overflow, over)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "data": to_dict(cfg),
        "sources": sources,
        "tokenizer": {"kind": "loaded" if cfg.tokenizer.path else cfg.tokenizer.kind, "file": "tokenizer.json"},
        "special_ids": {k.strip("<>"): v for k, v in ids.items()},
        "vocab_size": vocab_size,
        "dtype": dtype,
        "splits": stats,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _remove_stale_builds(out: Path) -> None:
    """Remove temporary folders that killed builds of ``out`` left behind (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp`` folder; the old folder is removed only after."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        if old.exists():
            old.rename(out)  # put the previous good output back
        raise
    shutil.rmtree(old, ignore_errors=True)


def summary_table(manifest: dict) -> str:
    """The closing table: split × sequences / tokens / unk% / p50 / p95 / max length."""
    rows = [("split", "sequences", "tokens", "unk%", "p50", "p95", "max")]
    for split, s in manifest["splits"].items():
        L = s["length"]
        rows.append((split, f"{s['sequences']:,}", f"{s['tokens']:,}", f"{100 * s['unk_rate']:.2f}", str(L["p50"]), str(L["p95"]), str(L["max"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    notes = [f"{name} {s[k]:,} {k}" for name, s in manifest["splits"].items() for k in ("split", "truncated", "dropped") if s[k]]
    tail = f"vocab_size {manifest['vocab_size']:,} ({manifest['tokenizer']['kind']}), {manifest.get('elapsed_s', 0):.1f} s"
    return "\n".join(lines + ([f"sequences over max_len={manifest['data']['max_len']}: {', '.join(notes)}"] if notes else []) + [tail])


@cli
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE), help="recipe YAML (default: recipes/wikitext.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted data.* overrides, e.g. data.max_len=128")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = p.parse_args(argv)
    if "=" in args.recipe:  # only overrides given: the default recipe
        args.overrides.insert(0, args.recipe)
        args.recipe = str(DEFAULT_RECIPE)
    cfg = load_data_config(args.recipe, args.overrides)
    manifest = prepare(cfg, force=args.force, quiet=args.quiet)
    print(cfg.output)
    return 0 if manifest else 1


if __name__ == "__main__":
    sys.exit(main())
