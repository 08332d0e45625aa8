"""Text → rows of ``<bos> ids <eos>``, and what ``data.max_len`` makes of longer rows: the
one encoder of ``pipeline.prepare``, ``pipeline.fast_word``, ``pipeline.streaming`` and
``lm.evaluate``.

A row is one text (a line, or a paragraph in ``document`` mode) as the tokenizer's ids,
without its post-processor, between ``<bos>`` and ``<eos>``; a missing text (``None``, a
null in Arrow) reads as ``""``, the row ``<bos> <eos>``. :func:`apply_max_len` is the one
overflow policy (``data.overflow``) for rows over ``data.max_len`` ids.

This module needs numpy and pyarrow; it is handed a ``tokenizers.Tokenizer``, never
imports one.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Overflow

_TEXTS_PER_CALL = 8192  # Encoding objects are heavy (tokens, offsets): few alive at once


class Encoder:
    """Encode texts to ``<bos> ids <eos>`` rows with a ``tokenizers.Tokenizer``.

    ``encode_batch_fast`` (no offsets) where the tokenizer has it, its Rust threads sharing
    a batch; the ids are those of ``Tokenizer.encode(text, add_special_tokens=False)``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
        bos, eos: the ids around every row.
    """

    def __init__(self, tokenizer, bos: int, eos: int) -> None:
        self.tokenizer, self.bos, self.eos = tokenizer, bos, eos

    def _ids(self, texts: Sequence[str | None]) -> Iterator[list[int]]:
        """Each text's ids, without ``<bos>``/``<eos>``."""
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        for s in range(0, len(texts), _TEXTS_PER_CALL):
            batch = [t if t is not None else "" for t in texts[s : s + _TEXTS_PER_CALL]]
            for e in encode_batch(batch, add_special_tokens=False):
                yield e.ids

    def encode(self, texts: Sequence[str | None]) -> list[list[int]]:
        """One row per text.

        Args:
            texts: the texts (``None`` reads as ``""``).

        Returns:
            ``[<bos>, ids..., <eos>]`` per text, in order; ``data.max_len`` not applied
            (:func:`apply_max_len`).
        """
        bos, eos = self.bos, self.eos
        return [[bos, *ids, eos] for ids in self._ids(texts)]

    def encode_arrow(self, text: pa.Array) -> pa.ListArray:
        """:meth:`encode` for a string array, Arrow out: the ids gathered straight into one
        numpy buffer, no Python list per row.

        Args:
            text: the texts (nulls read as ``""``).

        Returns:
            A ``list<int32>`` array, one row per text; ``data.max_len`` not applied.
        """
        text = pc.fill_null(text, "") if text.null_count else text
        ids = list(self._ids(text.to_pylist()))
        n_words = np.fromiter(map(len, ids), np.int64, len(ids))
        word_ids = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(n_words.sum()))
        return frame(word_ids, n_words, self.bos, self.eos)


def frame(word_ids: np.ndarray, n_words: np.ndarray, bos: int, eos: int) -> pa.ListArray:
    """Rows of ``<bos> ids <eos>`` from the ids of consecutive texts laid end to end.

    Args:
        word_ids: (sum(n_words),) every text's ids, in order.
        n_words: (n,) the number of ids of each text.
        bos, eos: the ids around every row.

    Returns:
        A ``list<int32>`` array of ``n`` rows, row ``i`` ``n_words[i] + 2`` long.
    """
    offsets = np.zeros(len(n_words) + 1, np.int64)
    np.cumsum(n_words + 2, out=offsets[1:])
    values = np.empty(int(offsets[-1]), np.int32)
    is_word = np.ones(len(values), bool)
    is_word[offsets[:-1]] = is_word[offsets[1:] - 1] = False
    values[offsets[:-1]] = bos
    values[offsets[1:] - 1] = eos
    values[is_word] = word_ids  # a boolean scatter: no index array per word
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))


def apply_max_len(rows: Iterable[list[int]], max_len: int | None, overflow: Overflow) -> list[list[int]]:
    """``data.overflow`` applied to the rows longer than ``data.max_len`` ids.

    ``split``: windows of ``max_len`` ids overlapping by one id — each window's first
    input is the previous window's last token, so every token is still predicted exactly
    once (the last window may be shorter, at least 2 ids); ``truncate``: the first
    ``max_len`` ids; ``drop``: the row goes. Shorter rows are kept as they are.

    Args:
        rows: ``<bos> ids <eos>`` rows (lists of ids).
        max_len: the most ids per row (at least 2); ``None``: no cap.
        overflow: ``split``, ``truncate`` or ``drop``.

    Returns:
        The rows, in order (a split row's windows in its place).
    """
    if max_len is None:
        return list(rows)
    m, out = max_len, []
    for ids in rows:
        if len(ids) <= m:
            out.append(ids)
        elif overflow == "truncate":
            out.append(ids[:m])
        elif overflow == "split":
            out.extend(ids[s : s + m] for s in range(0, len(ids) - 1, m - 1))
    return out
