"""Ingestion: ``python -m pipeline.prepare RECIPE [key=value ...] [--force]``.

source (hub id or local files, through ``datasets``: ``pipeline/sources.py``)
  → tokenizer (trained on train, streamed, or loaded; through ``tokenizers``: ``pipeline/tokenizer.py``)
  → ``<bos> ids <eos>`` per sequence, ``data.max_len`` applied, + a ``length`` column
    (``pipeline/encode.py``: Arrow kernels and ``encode_batch_fast`` on Arrow chunks,
    ``pipeline/fast_word.py``; ``Dataset.map`` with num_proc > 1)
  → ``data.output/{train,validation,test}/`` (memory-mappable Arrow),
    ``tokenizer.json`` and ``manifest.json``.

The output folder appears atomically: everything is built in a temporary sibling
folder and renamed at the end, so a killed or failed run never leaves a manifest
behind. Re-running with the same data section and unchanged sources is a cache hit.
"""
from __future__ import annotations

import codecs
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.config import SPLITS, DataConfig, load_data_config
from pipeline.data import MANIFEST, TokenDataset
from pipeline.encode import Encoder, apply_max_len
from pipeline.errors import ArgumentParser, UserError, cli
from pipeline.sources import LocalSplit, load_splits, local_splits
from pipeline.tokenizer import build_tokenizer, special_ids
from pipeline.typed_yaml import to_dict

FORMAT_VERSION = 1
DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "wikitext.yaml"


# --------------------------------------------------------------------------- source files


def _fingerprint_file(path: Path, validate_utf8: bool) -> dict:
    """sha256 of a source file; in the same pass, check that it decodes as UTF-8."""
    sha = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    ok = True
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
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


# --------------------------------------------------------------------------- encoding


def _encode_batch(batch: dict, encoder: Encoder, column: str) -> dict:
    """``Dataset.map`` function: a batch's texts → rows and their lengths."""
    rows = encoder.encode(batch[column])
    return {"input_ids": rows, "length": [len(r) for r in rows]}


def _cap_batch(batch: dict, max_len: int, overflow: str) -> dict:
    """``Dataset.map`` function: a batch's rows with ``data.max_len`` applied."""
    rows = apply_max_len(batch["input_ids"], max_len, overflow)
    return {"input_ids": rows, "length": [len(r) for r in rows]}


def _encode(cfg: DataConfig, ds, tokenizer, text_column: str, ids: dict, split: str, dtype: str):
    """A split's rows (``data.max_len`` applied) and how many were over it, before."""
    import datasets

    from pipeline import fast_word

    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value(dtype)), "length": datasets.Value("int32")})
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(ds) >= cfg.num_proc * cfg.batch_size else None
    word_level = fast_word.WordEncoder.supports(tokenizer)
    encoder = (fast_word.WordEncoder if word_level else Encoder)(tokenizer, ids["<bos>"], ids["<eos>"])
    if word_level or num_proc is None:
        # word level: split, look up and frame on Arrow buffers, same ids as the tokenizer; else
        # encode_batch_fast on large Arrow chunks, ids straight to numpy (fast_word.py)
        folder = Path(ds.cache_files[0]["filename"]).parent if ds.cache_files else Path(tempfile.mkdtemp(prefix="rnnlm-encode-"))
        path = folder / f"encoded-{split}-{os.getpid()}-{time.time_ns()}.arrow"
        enc = fast_word.encode_dataset(ds, text_column, encoder, features, path)
    else:
        enc = ds.map(
            _encode_batch,
            fn_kwargs={"encoder": encoder, "column": text_column},
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
            _cap_batch,
            fn_kwargs={"max_len": cfg.max_len, "overflow": cfg.overflow},
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


def _first_ids(ds: TokenDataset) -> np.ndarray:
    """Each row's first id, vectorised per record batch."""
    bounds = np.concatenate([[0], ds._chunk_ends])
    return np.concatenate([v[ds._starts[a:b]] for v, a, b in zip(ds._values, bounds[:-1], bounds[1:])] or [np.zeros(0)])


def _split_stats(ds: TokenDataset, unk_id: int | None, overflow: str, over: int) -> dict:
    lengths = ds.lengths
    n_unk = 0
    if unk_id is not None and len(lengths):
        # unknowns among the predicted ids: a row's first id is input only (<bos>, or under
        # overflow=split the previous window's last id, already counted there)
        firsts = _first_ids(ds)
        n_unk = int(sum(np.count_nonzero(v == unk_id) for v in ds._values) - np.count_nonzero(firsts == unk_id))
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


# data-section keys that say where and how fast (and whether the trainer streams), not what
# the prepared data holds: neither the cache fingerprint nor the "another data section" check sees them
NOT_WHAT = ("output", "num_proc", "batch_size", "stream")


def fingerprint(cfg: DataConfig, sources: list[dict]) -> str:
    """The cache key of a prepared folder: what it holds and what it was made from.

    Args:
        cfg: the ``data:`` section (its :data:`NOT_WHAT` keys left out).
        sources: the manifest's ``sources``: each local file's path, size and sha256 (or
            the hub id, name and revision), and a loaded tokenizer's sha256.

    Returns:
        16 hex digits, stored as the manifest's ``fingerprint``.
    """
    data = to_dict(cfg)
    for k in NOT_WHAT:
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
    local = None if cfg.source.hub else local_splits(cfg)
    if local is None:
        sources = [{"hub": cfg.source.hub, "name": cfg.source.name, "revision": cfg.source.revision}]
    else:
        sources = [
            {"split": s, **_fingerprint_file(f, validate_utf8=cfg.errors == "strict" and src.is_text)}
            for s, src in local.items()
            for f in src.files
        ]
    if cfg.tokenizer.path is not None and cfg.tokenizer.path.is_file():
        try:
            digest = hashlib.sha256(cfg.tokenizer.path.read_bytes()).hexdigest()
        except OSError as e:
            raise UserError(f"data.tokenizer.path: cannot read {cfg.tokenizer.path} ({e.strerror})") from None
        sources.append({"tokenizer": str(cfg.tokenizer.path), "sha256": digest})
    fp = fingerprint(cfg, sources)

    _recover_interrupted_swap(out)
    if out.exists():
        cached = _check_existing(cfg, out, fp, force, say)
        if cached is not None:
            return cached

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    made = _make_parents(out)
    try:
        _remove_stale_builds(out)
        tmp.mkdir()
        manifest = _build(cfg, local, tmp, sources, fp, say, quiet)
        manifest["elapsed_s"] = round(time.perf_counter() - t0, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _swap_in(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for p in made:  # a failed first build leaves no empty folders behind (innermost first)
            try:
                p.rmdir()
            except OSError:
                pass
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"data.output={out}: no space left on device; nothing was written") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not quiet:
        print(summary_table(manifest), file=sys.stderr)
    return manifest


def _build(cfg: DataConfig, local: dict[str, LocalSplit] | None, tmp: Path, sources: list[dict], fp: str, say, quiet: bool) -> dict:
    import datasets

    if quiet:
        datasets.disable_progress_bars()
    cache = tmp / ".cache"
    splits = load_splits(cfg, local=local, cache_dir=cache)
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

    tokenizer = build_tokenizer(cfg, splits["train"], col, quiet)
    ids = special_ids(tokenizer, where="tokenizer")
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


# what pipeline.prepare writes into data.output; a rebuild removes these and nothing else
OWN_ENTRIES = frozenset({*SPLITS, "tokenizer.json", MANIFEST})


def _check_existing(cfg: DataConfig, out: Path, fp: str, force: bool, say) -> dict | None:
    """Decide what to do with an existing ``data.output``: the manifest on a verified cache
    hit, ``None`` to (re)build, or a :class:`UserError` when a rebuild would destroy
    something that is not this recipe's prepared data."""
    if not out.is_dir():
        raise UserError(f"data.output={out} exists and is not a prepared dataset; refusing to overwrite it")
    try:
        entries = {p.name for p in out.iterdir()}
    except OSError as e:
        raise UserError(f"data.output={out}: cannot read ({e.strerror})") from None
    if MANIFEST not in entries:
        if entries:
            raise UserError(f"data.output={out} exists and is not a prepared dataset; refusing to overwrite it")
        return None
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        manifest = manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError):
        manifest = {}  # unreadable: damaged, rebuilt below
    if manifest.get("fingerprint") == fp and not force:
        problem = _verify(out, manifest)
        if problem is None:
            say(f"cache hit: {out} is up to date (fingerprint {fp}); use --force to rebuild")
            return manifest
        say(f"{out}: the prepared data is damaged ({problem}); rebuilding it")
    foreign = sorted(entries - OWN_ENTRIES)
    if foreign:
        raise UserError(f"data.output={out} also holds files pipeline.prepare did not write ({', '.join(foreign)}); "
                        "a rebuild would delete them: move them out, or choose another data.output")
    if not force and manifest.get("data") is not None:
        other = _other_data(manifest["data"], to_dict(cfg))
        if other:
            raise UserError(f"data.output={out} holds data prepared {other}; choose another data.output, or replace it "
                            "with python -m pipeline.prepare RECIPE --force")
    return None


def _other_data(old: dict, new: dict) -> str | None:
    """How the data in a folder differs from what this data section prepares (``None``: the
    same source and settings, e.g. only the files' content changed — a plain rebuild)."""
    def what(src: dict) -> str:
        if src.get("hub"):
            return f"hub {src['hub']}" + (f" ({src['name']})" if src.get("name") else "")
        if src.get("dir"):
            return str(src["dir"])
        files = src.get("files") or {}
        return "files " + ", ".join(str(f) for split in SPLITS for f in files.get(split) or [])

    if old.get("source") != new.get("source"):
        return f"from {what(old.get('source') or {})}, but this recipe's source is {what(new['source'])}"
    skip = {"source", *NOT_WHAT}
    a, b = _flat({k: v for k, v in old.items() if k not in skip}), _flat({k: v for k, v in new.items() if k not in skip})
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if keys:
        k = keys[0]
        return f"with another data section (data.{k}={json.dumps(a.get(k))}, this recipe: {json.dumps(b.get(k))})"
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _verify(out: Path, manifest: dict) -> str | None:
    """What is wrong with a prepared folder the manifest vouches for (``None``: nothing).

    A cache hit trusts the folder, so check what the trainer will read: the tokenizer file
    parses, and every split maps with exactly the manifest's sequences and tokens."""
    try:
        json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
        splits = manifest["splits"]
        for split, stats in splits.items():
            ds = TokenDataset(out, split)
            if (len(ds), ds.num_tokens) != (stats["sequences"], stats["tokens"]):
                return (f"{split} holds {len(ds):,} sequences / {ds.num_tokens:,} tokens, "
                        f"the manifest says {stats['sequences']:,} / {stats['tokens']:,}")
    except UserError as e:
        return str(e).split("; rebuild")[0]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return None


def _make_parents(out: Path) -> list[Path]:
    """Create ``out``'s parent folders; returns those that were made, innermost first."""
    made, p = [], out.parent
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"data.output={out}: {p} is a file, not a folder") from None
    except OSError as e:
        raise UserError(f"data.output={out}: cannot write there ({e.strerror})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise UserError(f"data.output={out}: cannot write there (Permission denied)")
    return made


def _remove_stale_builds(out: Path) -> None:
    """Remove temporary folders that killed builds of ``out`` left behind (their process is gone)."""
    for p in out.parent.glob(f".{out.name}.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            shutil.rmtree(p, ignore_errors=True)


def _recover_interrupted_swap(out: Path) -> None:
    """A build killed between the two renames of :func:`_swap_in` left ``.NAME.old-PID``:
    put it back when ``out`` is missing (the previous good data), else remove it."""
    if not out.parent.is_dir():
        return
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)) or not old.is_dir():
            continue
        if not out.exists() and (old / MANIFEST).is_file():
            old.rename(out)
        else:
            _remove_own(old)


def _remove_own(folder: Path) -> None:
    """Delete what prepare writes in ``folder`` (and the folder, if that leaves it empty)."""
    for name in (*OWN_ENTRIES, ".cache"):
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # something else is in it: never ours to delete


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
    if old.exists():
        _remove_own(old)


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
    from pipeline.config import DataRecipe
    from pipeline.confighelp import recipe_help

    p = ArgumentParser(prog="python -m pipeline.prepare",
                       description="Prepare a recipe's data: section: read the text (hub or local files), train or "
                                   "load a tokenizer, encode every sequence as <bos> ids <eos>, and write Arrow files, "
                                   "tokenizer.json and manifest.json to data.output. Unchanged sources and data "
                                   "section: a cache hit, nothing rebuilt.",
                       epilog="Keys of the data: section, their defaults and types (from pipeline/config.py):\n\n"
                              + recipe_help(DataRecipe))
    p.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE), help="recipe YAML (default: recipes/wikitext.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of data.* keys (listed below), e.g. data.max_len=128")
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
