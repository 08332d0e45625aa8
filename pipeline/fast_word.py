"""Word-level training and encoding on Arrow buffers, with the ids of ``tokenizers``.

``pipeline.prepare`` uses this for ``kind: word`` instead of ``WordLevelTrainer`` and
``Tokenizer.encode_batch``: the text column is split with pyarrow's
``utf8_split_whitespace``, counted with ``value_counts`` and mapped to ids with
``dictionary_encode`` + ``index_in``, all in C++ over Arrow buffers, with no Python
object per word. The result is the tokenizer ``tokenizers`` would train (the same
``tokenizer.json``) and the ids it would give, exactly:

* whitespace: ``utf8_split_whitespace`` splits on every character Rust's
  ``char::is_whitespace`` (``WhitespaceSplit``) does, plus U+001C..U+001F (checked over
  all code points in tests/pipeline/test_fast_word.py). Rows holding one of those four
  bytes are handed to the ``tokenizers`` pre-tokenizer / tokenizer instead.
* added tokens: ``tokenizers`` cuts special tokens (``<unk>`` ...) out of the raw text
  before splitting, also inside a word (``a<unk>b`` → ``a``, ``<unk>``, ``b``). Rows
  with such a word are encoded by the tokenizer itself; a word equal to a special maps
  to the special's id either way.
* vocabulary order: ``WordLevelTrainer`` sorts by count, descending, then by the word's
  bytes, ascending; keeps counts ``>= min_frequency``; puts the special tokens first and
  cuts the list at ``vocab_size``, then drops words equal to a special (which so still
  take a slot: tested against the trainer).

Not covered (``pipeline.prepare`` then uses ``tokenizers`` throughout, through
:class:`pipeline.encode.Encoder`): a normalizer (``lowercase``, ``nfkc``), other
pre-tokenizers or models. :func:`encode_dataset` writes the rows of either encoder.
"""
from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.encode import Encoder, frame

# the only characters utf8_split_whitespace splits on that Rust's char::is_whitespace does not;
# ASCII, so in UTF-8 they are single bytes that never occur inside a multi-byte character
_ARROW_ONLY_SPACE = (0x1C, 0x1D, 0x1E, 0x1F)
ROWS_PER_CHUNK = 1 << 16  # rows per Arrow chunk: large enough that per-chunk Python is noise
THREADS = min(4, os.cpu_count() or 1)


def _text_chunks(ds, column: str, rows: int | None = None) -> Iterator[pa.Array]:
    """The text column of a ``datasets.Dataset`` in chunks, nulls as ``""``.

    Zero-copy slices of the memory-mapped table when the dataset has no indices mapping
    (a split as loaded); through ``datasets``' Arrow formatting otherwise (a held-out split).
    """
    rows = rows or ROWS_PER_CHUNK
    if getattr(ds, "_indices", None) is None:
        whole = ds.data.table.column(column) if hasattr(ds.data, "table") else ds.data.column(column)
        pieces = (whole.slice(start, rows) for start in range(0, len(whole), rows))
    else:
        pieces = (t.column(0) for t in ds.select_columns([column]).with_format("arrow").iter(batch_size=rows))
    for piece in pieces:
        if piece.num_chunks == 1:
            arr = piece.chunk(0)
        else:
            # copied with one " " row after the last, sliced off: the copy's last string does not
            # end its buffer. A wrong last word of such a chunk's last row was seen twice
            # (PTB test row 1999, the id of <unk>), never reproduced in isolation; bytes read
            # past a buffer's end are the suspect, and a space there is harmless to a word split.
            arr = pa.concat_arrays([*piece.chunks, pa.array([" "], piece.type)]).slice(0, len(piece))
        yield pc.fill_null(arr, "") if arr.null_count else arr


def _threaded(fn, items: Iterator, threads: int = THREADS) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, at most ``threads + 1`` items in flight.

    pyarrow's kernels and numpy release the GIL, so chunks overlap on several cores;
    the bounded window keeps memory a few chunks deep.
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > threads:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _rows_with_arrow_only_space(text: pa.Array) -> np.ndarray:
    """Indices of the rows of ``text`` holding U+001C..U+001F (see the module docstring)."""
    offsets_buf, data_buf = text.buffers()[1], text.buffers()[2]
    if data_buf is None:
        return np.empty(0, np.int64)
    off_type = np.int64 if pa.types.is_large_string(text.type) else np.int32
    offsets = np.frombuffer(offsets_buf, off_type)[text.offset : text.offset + len(text) + 1]
    data = np.frombuffer(data_buf, np.uint8)[offsets[0] : offsets[-1]]
    hits = np.flatnonzero((data >= _ARROW_ONLY_SPACE[0]) & (data <= _ARROW_ONLY_SPACE[-1]))
    if not len(hits):
        return np.empty(0, np.int64)
    return np.unique(np.searchsorted(offsets, hits + offsets[0], side="right") - 1)


def _without_rows(text: pa.Array, rows: np.ndarray) -> pa.Array:
    """``text`` with the given rows emptied (they are handled by ``tokenizers``)."""
    if not len(rows):
        return text
    mask = np.zeros(len(text), bool)
    mask[rows] = True
    return pc.if_else(pa.array(mask), pa.scalar("", text.type), text)


# --------------------------------------------------------------------------- training


def split_words(text: pa.Array) -> pa.ListArray:
    """``utf8_split_whitespace`` pieces per row, dictionary-encoded (``list<dictionary<int32, string>>``)."""
    split = pc.utf8_split_whitespace(text)
    return pa.ListArray.from_arrays(split.offsets, pc.list_flatten(split).dictionary_encode())


def count_words(chunks: Iterator[pa.Array], threads: int = THREADS, spill: Path | None = None) -> dict[str, int]:
    """How often each ``WhitespaceSplit`` pre-token occurs in the text chunks.

    Args:
        chunks: string arrays.
        threads: chunks processed at once.
        spill: if given, the split words of every chunk are written there (an Arrow IPC
            stream, one batch per chunk), so that encoding the same chunks later need not
            split and hash them again (:func:`encode_dataset`).
    """
    def merge(tables: list[pa.Table]) -> pa.Table:  # a group-by in Arrow: no Python object per word
        g = pa.concat_tables(tables).group_by("w").aggregate([("c", "sum")])
        return pa.table({"w": g.column("w"), "c": g.column("c_sum")})

    parts, extra, writer = [], {}, None
    try:
        for table, odd, words in _threaded(_count_chunk, chunks, threads):
            parts.append(table)
            if len(parts) >= 32:  # memory grows with the vocabulary, not with the corpus
                parts = [merge(parts)]
            for w, n in odd.items():
                extra[w] = extra.get(w, 0) + n
            if spill is not None:
                if writer is None:
                    writer = pa.ipc.new_stream(str(spill), pa.schema([("words", words.type)]))
                writer.write_batch(pa.record_batch([words], names=["words"]))
    finally:
        if writer is not None:
            writer.close()
    if not parts:
        return extra
    total = merge(parts)
    counts = dict(zip(total.column("w").to_pylist(), total.column("c").to_pylist()))
    counts.pop("", None)  # utf8_split_whitespace keeps empty edge pieces; WhitespaceSplit has none
    for w, n in extra.items():
        counts[w] = counts.get(w, 0) + n
    return counts


def _count_chunk(text: pa.Array) -> tuple[pa.Table, dict[str, int], pa.ListArray]:
    from tokenizers import pre_tokenizers

    odd, extra = _rows_with_arrow_only_space(text), {}
    if len(odd):  # rare: these rows are split the way tokenizers splits them
        split = pre_tokenizers.WhitespaceSplit()
        for i in odd:
            for w, _ in split.pre_tokenize_str(text[int(i)].as_py()):
                extra[w] = extra.get(w, 0) + 1
    words = split_words(_without_rows(text, odd))  # odd rows: empty here, re-encoded by tokenizers later
    dictionary, indices = words.values.dictionary, words.values.indices.to_numpy(zero_copy_only=False)
    counts = np.bincount(indices, minlength=len(dictionary))
    return pa.table({"w": dictionary, "c": pa.array(counts, pa.int64())}), extra, words


def count_dataset_words(ds, column: str) -> dict[str, int]:
    """:func:`count_words` over a ``datasets.Dataset``'s text column, keeping the split words
    for :func:`encode_dataset` of the same dataset (in a file next to its cache)."""
    spill = _scratch(ds, "words")
    counts = count_words(_text_chunks(ds, column), spill=spill)
    _SPILLS[ds] = (spill, column)
    return counts


def _scratch(ds, what: str) -> Path:
    """A fresh file name in the dataset's cache folder (or a temporary one)."""
    import tempfile
    import time

    folder = Path(ds.cache_files[0]["filename"]).parent if ds.cache_files else Path(tempfile.mkdtemp(prefix="rnnlm-"))
    return folder / f"{what}-{os.getpid()}-{time.time_ns()}.arrow"


_SPILLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # dataset → (split words file, column)


def word_vocab(counts: dict[str, int], specials: Sequence[str], vocab_size: int | None, min_frequency: int) -> list[str]:
    """The words ``WordLevelTrainer`` keeps, in its order (specials excluded).

    Args:
        counts: word → occurrences in the training text.
        specials: the special tokens, which the trainer puts first.
        vocab_size: the trainer's ``vocab_size`` (specials included); ``None`` keeps all.
        min_frequency: drop words seen fewer times.

    Returns:
        The non-special words, most frequent first, ties in byte order of the word
        (Python's ``str`` order is code-point order, which is UTF-8 byte order).
    """
    words = sorted((w for w, n in counts.items() if n >= min_frequency), key=lambda w: (-counts[w], w))
    if vocab_size is not None:
        # the trainer cuts before it drops words equal to a special: such a word still takes a slot
        words = words[: max(vocab_size - len(specials), 0)]
    special = set(specials)
    return [w for w in words if w not in special]


def word_tokenizer(words: Sequence[str], specials: Sequence[str], unk: str):
    """A ``tokenizers`` WordLevel + WhitespaceSplit tokenizer: specials at ids 0.., then ``words``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {s: i for i, s in enumerate(specials)}
    vocab.update((w, len(specials) + k) for k, w in enumerate(words))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


# --------------------------------------------------------------------------- encoding


class WordEncoder(Encoder):
    """:class:`pipeline.encode.Encoder` for a WordLevel tokenizer, its :meth:`encode_arrow`
    in Arrow kernels: the same rows, no Python object per word.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``; see :func:`supports`.
        bos, eos: the ids around every row.
    """

    def __init__(self, tokenizer, bos: int, eos: int) -> None:
        super().__init__(tokenizer, bos, eos)
        spec = json.loads(tokenizer.to_str())
        vocab = spec["model"]["vocab"]
        self.unk = vocab[spec["model"]["unk_token"]]
        words = sorted(vocab, key=vocab.get)
        if [vocab[w] for w in words] != list(range(len(words))):  # index_in gives positions: ids must be 0..n-1
            raise ValueError("WordLevel ids are not contiguous from 0")
        self.vocab = pa.array(words, pa.string())
        self.added = {t["content"]: t["id"] for t in spec["added_tokens"]}

    @staticmethod
    def supports(tokenizer) -> bool:
        """Whether :class:`WordEncoder` reproduces ``tokenizer`` exactly: a WordLevel model,
        ``WhitespaceSplit``, no normalizer or post-processor, plain added tokens."""
        spec = json.loads(tokenizer.to_str())
        model = spec.get("model") or {}
        if model.get("type") != "WordLevel" or model.get("unk_token") not in model.get("vocab", {}):
            return False
        if spec.get("normalizer") is not None or spec.get("post_processor") is not None:
            return False
        if spec.get("pre_tokenizer") != {"type": "WhitespaceSplit"}:
            return False
        plain = all(not (t["lstrip"] or t["rstrip"] or t["single_word"] or t["normalized"]) and t["content"] for t in spec["added_tokens"])
        return plain and len(set(model["vocab"].values())) == len(model["vocab"])

    def _odd_words(self, dictionary: pa.Array, dict_ids: np.ndarray) -> np.ndarray:
        """Positions in ``dictionary`` of words ``tokenizers`` would cut at an added token."""
        odd = np.zeros(len(dictionary), bool)
        for content, tid in self.added.items():
            has = pc.match_substring(dictionary, content).to_numpy(zero_copy_only=False)
            exact = pc.equal(dictionary, content).to_numpy(zero_copy_only=False)
            odd |= has & ~exact
            odd |= exact & (dict_ids != tid)
        return np.flatnonzero(odd)

    def encode_arrow(self, text: pa.Array, words: pa.ListArray | None = None) -> pa.ListArray:
        """``<bos> ids <eos>`` for every row of a string array (nulls read as ``""``).

        Args:
            text: the rows.
            words: ``split_words(text)`` if already made (rows holding U+001C..U+001F may
                have been emptied in it: they are re-encoded from ``text`` either way).

        Returns:
            A ``list<int32>`` array, one row per text row.
        """
        text = pc.fill_null(text, "") if text.null_count else text
        odd_rows = set(_rows_with_arrow_only_space(text).tolist())
        words = split_words(text) if words is None else words
        piece_offsets = words.offsets.to_numpy()  # (n_rows + 1,)
        piece_offsets = piece_offsets - piece_offsets[0]
        n_words = np.diff(piece_offsets).astype(np.int64)  # (n_rows,)
        enc = words.values.slice(words.offsets[0].as_py(), int(piece_offsets[-1]))
        dictionary, indices = enc.dictionary, enc.indices.to_numpy(zero_copy_only=False)
        dict_ids = pc.fill_null(pc.index_in(dictionary, value_set=self.vocab), self.unk).to_numpy(zero_copy_only=False)
        dict_ids = dict_ids.astype(np.int32)  # a writable copy
        for w, tid in self.added.items():  # a word equal to an added token gets its id even if not in the vocabulary
            dict_ids[pc.equal(dictionary, w).to_numpy(zero_copy_only=False)] = tid
        word_ids = dict_ids[indices]  # (n_pieces,)

        def rows_of(mask: np.ndarray) -> np.ndarray:
            return np.searchsorted(piece_offsets, np.flatnonzero(mask), side="right") - 1

        empty = pc.index_in(pa.scalar("", dictionary.type), value_set=dictionary).as_py()
        if empty is not None:
            # utf8_split_whitespace yields "" for leading/trailing whitespace; WhitespaceSplit yields nothing
            is_empty = indices == empty
            n_words -= np.bincount(rows_of(is_empty), minlength=len(text))
            word_ids = word_ids[~is_empty]
        odd = self._odd_words(dictionary, dict_ids)
        if len(odd):
            odd_rows.update(np.unique(rows_of(np.isin(indices, odd))).tolist())
        out = frame(word_ids, n_words, self.bos, self.eos)
        if odd_rows:
            out = self._replace_rows(out, text, sorted(odd_rows))
        return out

    def _replace_rows(self, out: pa.ListArray, text: pa.Array, rows: list[int]) -> pa.ListArray:
        """Re-encode ``rows`` with the tokenizer itself and splice them into ``out``."""
        fixed = dict(zip(rows, self.encode([text[i].as_py() for i in rows])))
        offsets = out.offsets.to_numpy()
        values = out.values.to_numpy()
        pieces, lengths, start = [], np.diff(offsets).astype(np.int64), 0
        for r in rows:
            pieces += [values[offsets[start] : offsets[r]], np.asarray(fixed[r], np.int32)]
            lengths[r] = len(fixed[r])
            start = r + 1
        pieces.append(values[offsets[start] :])
        new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(new_offsets), pa.array(np.concatenate(pieces), pa.int32()))


def encode_dataset(ds, column: str, encoder: Encoder, features, path: Path, rows: int | None = None):
    """Encode a ``datasets.Dataset`` chunk by chunk into an Arrow file; return it memory-mapped.

    The rows are written as they are made (datasets' own ``ArrowWriter``, the format
    ``Dataset.map`` writes), so memory stays one chunk deep whatever the corpus size.

    Args:
        ds: the split (its text column is read as Arrow, never as Python strings).
        column: the text column.
        encoder: a :class:`pipeline.encode.Encoder` (a :class:`WordEncoder` reuses the
            words :func:`count_dataset_words` split, if it counted this dataset).
        features: the output ``datasets.Features`` (``input_ids``, ``length``).
        path: the Arrow file to write.

    Returns:
        ``datasets.Dataset`` over ``path``.
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    id_type = features["input_ids"].feature.pa_type
    def table(item: tuple[pa.Array, pa.ListArray | None]) -> pa.Table:
        ids = encoder.encode_arrow(*item) if isinstance(encoder, WordEncoder) else encoder.encode_arrow(item[0])
        lengths = pc.list_value_length(ids).cast(pa.int32())
        return pa.table({"input_ids": pa.ListArray.from_arrays(ids.offsets, ids.values.cast(id_type)), "length": lengths})

    writer = ArrowWriter(features=features, path=str(path))
    threads = THREADS if isinstance(encoder, WordEncoder) else 1  # tokenizers runs its own threads
    spill, spill_column = _SPILLS.pop(ds, (None, None))
    chunks = _text_chunks(ds, column, rows)
    if spill is not None and spill_column == column and rows is None:
        # the words count_dataset_words split and hashed already, chunk for chunk
        # read, not memory-mapped: each batch is freed after use, so the spill never counts in RSS
        batches = (b.column(0) for b in pa.ipc.open_stream(pa.OSFile(str(spill))))
        items = zip(chunks, batches, strict=True)
    else:
        items = ((c, None) for c in chunks)
    try:
        for t in _threaded(table, items, threads):
            writer.write_table(t)
    finally:
        if spill is not None:
            spill.unlink(missing_ok=True)
    if writer._num_examples == 0 and writer.pa_writer is None:  # an empty split: still a valid file
        writer.write_table(pa.table({"input_ids": pa.array([], pa.list_(id_type)), "length": pa.array([], pa.int32())}))
    writer.finalize()
    writer.close()
    return datasets.Dataset.from_file(str(path))


# --------------------------------------------------------------------------- reading lines

BLOCK_BYTES = 1 << 24  # 16 MB: a few blocks in flight keep memory flat


def _line_blocks(path: Path) -> Iterator[bytes]:
    """The file in blocks that end after a ``\\n`` (the last may not), its UTF-8 BOM dropped."""
    block_bytes, carry = BLOCK_BYTES, b""
    with open(path, "rb") as f:
        first = True
        while chunk := f.read(block_bytes):
            if first and chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
            first = False
            chunk = carry + chunk
            cut = chunk.rfind(b"\n") + 1
            carry = chunk[cut:]
            if cut:
                yield chunk[:cut]
    if carry:
        yield carry


def load_text_lines(files: Sequence[Path], path: Path):
    """One row per line of UTF-8 text files, as ``datasets.load_dataset("text")`` gives them.

    That loader reads with Python's universal newlines (``\\r\\n`` and ``\\r`` become
    ``\\n``) and ``encoding="utf-8-sig"`` (a BOM at the start of a file is dropped), then
    splits on ``\\n`` only; here the same happens to whole blocks in Arrow kernels instead of
    a Python string per line, and the rows are written to the Arrow file ``path``.

    Args:
        files: the split's text files, in order (already checked to be valid UTF-8).
        path: the Arrow file to write.

    Returns:
        ``datasets.Dataset`` over ``path``, one ``text`` column.
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    def lines_of(block: bytes) -> pa.Table:
        text = pa.array([block], pa.large_binary()).cast(pa.large_string())  # validates UTF-8
        text = pc.replace_substring(pc.replace_substring(text, "\r\n", "\n"), "\r", "\n")
        lines = pc.list_flatten(pc.split_pattern(text, "\n"))
        if block.endswith((b"\n", b"\r")):
            lines = lines.slice(0, len(lines) - 1)  # the empty piece after the last line break
        return pa.table({"text": lines.cast(pa.string())})

    writer = ArrowWriter(features=datasets.Features({"text": datasets.Value("string")}), path=str(path))
    rows = 0
    blocks = (block for file in files for block in _line_blocks(Path(file)))
    for table in _threaded(lines_of, blocks):
        writer.write_table(table)
        rows += table.num_rows
    if not rows:
        writer.write_table(pa.table({"text": pa.array([], pa.string())}))
    writer.finalize()
    writer.close()
    return datasets.Dataset.from_file(str(path))
