"""Length bucketing for streams: :class:`StreamBucketBatcher`, and encoded rows read with
``datasets.load_dataset(..., streaming=True)`` (:func:`stream_splits`).

:class:`BucketBatchSampler` needs every length up front; a stream (a Hugging Face
``IterableDataset``, a generator, a file read line by line) has none. The batcher keeps a
bounded buffer of rows, grouped into length bins estimated from the first rows (as
lhotse's ``DynamicBucketingSampler`` does with durations), and cuts each batch from one
bin, sorted by length, so rows of a batch have nearly equal lengths.

This module imports torch and numpy only; :func:`stream_splits` imports ``datasets``
and ``tokenizers`` when called.
"""
from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

__all__ = ["StreamBucketBatcher", "open_stream", "stream_splits", "until_first_rank_ends"]

Cost = Literal["unpadded", "padded"]


class StreamBucketBatcher(IterableDataset):
    """Batches of similar-length rows from a stream, in bounded memory.

    A pass (one epoch) over ``source``:

    1. **Shard.** The stream's items are numbered 0, 1, 2, ...; with ``S`` shards
       (``num_replicas`` ranks x DataLoader workers) shard ``k = rank * workers +
       worker`` keeps the items ``i`` with ``i % S == k``. Every item lands in exactly
       one shard, whatever the source (each shard reads the stream and skips the others'
       items; for a Hugging Face dataset with many files, ``split_dataset_by_node``
       before the batcher saves that reading). A Hugging Face ``IterableDataset``
       splits itself between DataLoader workers (by file: with one file, one worker
       reads and the others idle), so for it only ranks are sharded here.
    2. **Bins.** ``bins`` (ascending upper length edges) if given; else quantiles of the
       first ``bin_sample`` lengths of the shard, ``num_bins`` of them.
    3. **Buffer.** Rows enter their bin, sorted by (length, stream position). When
       ``buffer_size`` rows are held, one batch leaves: a bin is drawn (seeded; chance
       proportional to its rows, among bins holding more than one batch's budget, else
       the fullest), and the batch is the run of the bin's sorted rows from a drawn start,
       extended to longer rows until the budget is met, then to shorter ones.
    4. **Budget.** At most ``batch_size`` rows and/or ``max_tokens`` tokens, counted
       by ``cost``: ``"unpadded"`` = sum of lengths (a packed RNN), ``"padded"`` = rows x
       longest. A row longer than ``max_tokens`` raises ``ValueError``.
    5. **End.** When the stream ends, every bin is cut into batches (the last of a bin
       may be short), and those batches come out in a seeded random order.

    Rows are yielded as they came (lists, arrays or dict rows), longest first in a batch
    (equal lengths: later stream position first).
    Randomness comes from ``np.random.default_rng([seed, epoch, shard])``; call
    :meth:`set_epoch` before each pass (also passed on to ``source.set_epoch``, which a
    Hugging Face ``IterableDataset`` uses to reshuffle).

    Memory: the buffer (``buffer_size`` rows), nothing per stream item.

    Distributed training: ranks get different numbers of batches (their shards differ),
    and the batcher itself never communicates. So that the uneven end of an epoch does
    not hang a rank in a collective, either iterate through :func:`until_first_rank_ends`
    (every rank stops at the first rank's end; the few batches the others still held are
    dropped for that epoch — the policy for a trainer that all-reduces every step), or,
    when gradient all-reduces are the only collectives, train the epoch under
    ``DistributedDataParallel.join()``, which lets finished ranks shadow them, so every
    row trains exactly once.

    Resuming: :meth:`state_dict` taken between batches of a pass (the trainer's loop, with
    ``num_workers=0``) holds the shard's stream position, the buffered rows and the
    generator state; a batcher given it by :meth:`load_state_dict` continues that pass
    with exactly the batches the first one would have yielded next. The stream is
    re-opened and the consumed items skipped (read, not re-emitted); with DataLoader
    workers the state lives in the workers (use torchdata's ``StatefulDataLoader``).

    Args:
        source: an iterable of rows, iterated once per pass (list, ``IterableDataset``),
            or a zero-argument callable returning a fresh iterator (for generators).
        batch_size: most rows per batch.
        max_tokens: token budget per batch, counted by ``cost``. At least one of the two.
        cost: ``"unpadded"`` or ``"padded"``, as above.
        buffer_size: rows held before a batch leaves (memory vs. padding efficiency).
        bins: ascending upper length edges; a row goes to the first bin whose edge is
            ``>=`` its length (past the last: the last bin). ``None``: estimated.
        num_bins: bins to estimate when ``bins`` is ``None``.
        bin_sample: how many first lengths of a shard estimate the bins.
        shuffle: seeded draws; ``False`` takes the fullest bin from its shortest rows
            and emits the end batches in bin order (deterministic, for evaluation).
        seed: base seed; the same on every rank.
        key: the field holding the ids in dict rows.
        num_replicas, rank: the DDP world; ``None`` reads ``torch.distributed`` if it is
            initialised, else 1 and 0.
    """

    def __init__(
        self,
        source: Iterable[Any] | Callable[[], Iterator[Any]],
        *,
        batch_size: int | None = None,
        max_tokens: int | None = None,
        cost: Cost = "unpadded",
        buffer_size: int = 10_000,
        bins: Sequence[int] | None = None,
        num_bins: int = 32,
        bin_sample: int = 1_000,
        shuffle: bool = True,
        seed: int = 0,
        key: str = "input_ids",
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size is None and max_tokens is None:
            raise ValueError("give batch_size, max_tokens, or both")
        for name, v in (("batch_size", batch_size), ("max_tokens", max_tokens)):
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if cost not in ("unpadded", "padded"):
            raise ValueError(f"cost must be 'unpadded' or 'padded', got {cost!r}")
        if buffer_size < 1 or num_bins < 1 or bin_sample < 1:
            raise ValueError(f"buffer_size, num_bins, bin_sample must be >= 1, got {buffer_size}, {num_bins}, {bin_sample}")
        if bins is not None and (not len(bins) or list(bins) != sorted(set(bins))):
            raise ValueError(f"bins must be strictly ascending length edges, got {list(bins)}")
        if num_replicas is None or rank is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            num_replicas = torch.distributed.get_world_size() if dist else 1
            rank = torch.distributed.get_rank() if dist else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas=} {rank=}")
        self.source = source
        self.batch_size, self.max_tokens, self.cost = batch_size, max_tokens, cost
        self.buffer_size, self.num_bins, self.bin_sample = buffer_size, num_bins, bin_sample
        self.bins = None if bins is None else [int(b) for b in bins]
        self.shuffle, self.seed, self.key = shuffle, int(seed), key
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self._live: _Pass | None = None  # the pass being iterated in this process
        self._restore: dict | None = None  # a loaded state, for the next pass
        self._finished: dict | None = None  # the state at the end of the last complete pass

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next pass's draws (and the source's, if it has ``set_epoch``)."""
        if self._restore is not None and self._restore["epoch"] != int(epoch):
            self._restore = None  # a loaded state belongs to its own epoch only
        self.epoch = int(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(self.epoch)

    def _shard(self) -> tuple[int, int]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if type(self.source).__module__.startswith("datasets."):
            # a Hugging Face IterableDataset splits itself between DataLoader workers (by file)
            workers, worker = 1, 0
        return self.num_replicas * workers, self.rank * workers + worker

    def __iter__(self) -> Iterator[list[Any]]:
        num_shards, shard = self._shard()
        state, self._restore = self._restore, None
        if state is not None and (state["num_shards"], state["shard"]) != (num_shards, shard):
            raise ValueError(f"state of shard {state['shard']}/{state['num_shards']} loaded into shard {shard}/{num_shards}")
        p = _Pass(self, num_shards, shard, state)
        self._live, self._finished = p, None
        try:
            yield from p.run()
            self._finished = p.state()  # a checkpoint after the last batch must not replay the epoch
        finally:
            if self._live is p:
                self._live = None

    # ---------------------------------------------------------------- resume

    def _config(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "max_tokens": self.max_tokens, "cost": self.cost,
                "buffer_size": self.buffer_size, "bins": self.bins, "num_bins": self.num_bins,
                "bin_sample": self.bin_sample, "shuffle": self.shuffle, "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        """The pass in progress; after a complete pass, its end (loading it makes the next
        pass of that epoch empty; ``set_epoch(epoch + 1)`` starts the next one); before
        any pass, the start of the current epoch.

        Returns:
            ``{"epoch", "num_shards", "shard", "consumed", "bins", "buffer", "rng",
            "upstream", "config"}``: plain Python values and the buffered rows; save it
            with ``torch.save``.
        """
        if self._live is not None:
            return self._live.state()
        if self._restore is not None:
            return self._restore
        if self._finished is not None and self._finished["epoch"] == self.epoch:
            return self._finished
        num_shards, shard = self._shard()
        return {"epoch": self.epoch, "num_shards": num_shards, "shard": shard, "consumed": 0, "bins": None,
                "buffer": [], "rng": None, "upstream": None, "done": False, "config": self._config()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Make the next pass continue from ``state``.

        Raises:
            ValueError: the state was saved with other options (its draws would differ).
        """
        mine = self._config()
        diff = {k: (v, mine.get(k)) for k, v in state["config"].items() if mine.get(k) != v}
        if diff:
            raise ValueError("batcher state does not match: " + ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()))
        self.epoch = int(state["epoch"])
        self._restore = state


_SHIFT = 40  # a buffered row's key: length << _SHIFT | stream position (positions < 2**40)
_POS = (1 << _SHIFT) - 1


class _Pass:
    """One pass of one shard: the buffer, the draws, the stream position.

    A buffered row is an int key, ``length << 40 | position``, in its bin's list, and the
    row itself in ``rows`` under its position: sorting a bin sorts plain ints (by length,
    then position), and nothing but the row is kept per row (no tuple per row for the
    garbage collector to scan while it waits in the buffer).
    """

    def __init__(self, b: StreamBucketBatcher, num_shards: int, shard: int, state: dict | None) -> None:
        self.b, self.num_shards, self.shard = b, num_shards, shard
        self.rng = np.random.default_rng([b.seed, b.epoch, shard])
        self.consumed = 0  # stream items read (all shards' items, this shard's kept)
        self.edges: list[int] | None = b.bins
        self.rows: dict[int, Any] = {}  # position -> row, for every buffered row
        self.sample: list[int] = []  # keys read before the bins are known
        self.bins: list[list[int]] = [[] for _ in self.edges or ()]  # per bin: keys (sorted before a cut)
        self.tokens = [0] * len(self.bins)  # per bin: the sum of its lengths
        self.longest = [0] * len(self.bins)  # per bin: its longest length
        self.unsorted: set[int] = set()  # bins appended to since their last sort
        self.held = 0
        self.done = False  # the stream ended; the tail batches are being emitted
        self.tail: list[list[Any]] = []
        self.upstream = None
        if state is not None:
            self.consumed, self.edges, self.done, self.upstream = state["consumed"], state["bins"], state["done"], state["upstream"]
            if state["rng"] is not None:  # None: saved before the pass began
                self.rng.bit_generator.state = state["rng"]
            keys = []
            for n, pos, row in state["buffer"]:
                keys.append(n << _SHIFT | pos)
                self.rows[pos] = row
            if self.edges is None:
                self.sample = keys
            else:
                self.bins = [[] for _ in range(len(self.edges))]
                self.tokens, self.longest = [0] * len(self.edges), [0] * len(self.edges)
                for k in keys:  # a bin's order does not matter: it is sorted before every cut
                    self._add(k)
            self.held = len(keys)
            self.tail = [list(t) for t in state.get("tail", [])]

    def state(self) -> dict[str, Any]:
        keys = self.sample if self.edges is None else [k for bin_ in self.bins for k in bin_]
        upstream = None
        src = self.b.source
        if hasattr(src, "state_dict") and callable(getattr(src, "load_state_dict", None)) and self.num_shards == 1:
            upstream = src.state_dict()
        buffer = [[k >> _SHIFT, k & _POS, self.rows[k & _POS]] for k in keys]
        return {"epoch": self.b.epoch, "num_shards": self.num_shards, "shard": self.shard, "consumed": self.consumed,
                "bins": self.edges, "buffer": buffer, "rng": self.rng.bit_generator.state,
                "upstream": upstream, "done": self.done, "tail": [list(t) for t in self.tail], "config": self.b._config()}

    # ---------------------------------------------------------------- the stream

    def _items(self) -> Iterator[Any]:
        """The stream from the first unconsumed item (every shard's items; :meth:`run` keeps its own)."""
        src = self.b.source
        if self.upstream is not None:
            src.load_state_dict(self.upstream)  # a Hugging Face IterableDataset resumes itself
            return iter(src)
        it = iter(src() if callable(src) and not hasattr(src, "__iter__") else src)
        return itertools.islice(it, self.consumed, None)  # re-read, not re-emitted

    def _add(self, key: int) -> None:
        n = key >> _SHIFT
        i = min(bisect.bisect_left(self.edges, n), len(self.edges) - 1)
        self.bins[i].append(key)  # sorted when a batch is cut from the bin (see _cut)
        self.unsorted.add(i)
        self.tokens[i] += n
        if n > self.longest[i]:
            self.longest[i] = n
        self.held += 1

    def _estimate_bins(self) -> None:
        lengths = np.array([k >> _SHIFT for k in self.sample])
        qs = np.quantile(lengths, np.linspace(0, 1, self.b.num_bins + 1)[1:], method="higher") if len(lengths) else [1]
        self.edges = sorted({int(q) for q in qs})
        self.bins = [[] for _ in self.edges]
        self.tokens, self.longest = [0] * len(self.edges), [0] * len(self.edges)
        sample, self.sample, self.held = self.sample, [], 0
        for k in sample:
            self._add(k)

    # ---------------------------------------------------------------- batches

    def _over(self, n: int, total: int, longest: int) -> bool:
        """Whether ``n`` rows of ``total`` tokens, the longest ``longest``, exceed one batch's budget."""
        b = self.b
        if b.batch_size is not None and n > b.batch_size:
            return True
        return b.max_tokens is not None and (total if b.cost == "unpadded" else n * longest) > b.max_tokens

    def _cut(self, i: int, start: int) -> list[int]:
        """Remove and return the keys of the run of bin ``i`` from ``start`` (then below it) that fills the budget."""
        bin_, bs, mt = self.bins[i], self.b.batch_size, self.b.max_tokens
        if i in self.unsorted:
            bin_.sort()  # ints: by length, then stream position
            self.unsorted.discard(i)
        n = len(bin_)
        if mt is None:  # rows only: no per-row test
            hi = min(start + bs, n)
            lo = max(0, hi - bs)
            total = sum(k >> _SHIFT for k in bin_[lo:hi])
        else:
            padded, rows_cap = self.b.cost == "padded", bs or n
            hi, total, longest = start, 0, 0
            while hi < n and hi - start < rows_cap:
                length = bin_[hi] >> _SHIFT  # ascending: the newest row is the longest
                if (hi - start + 1) * length > mt if padded else total + length > mt:
                    break
                total, longest = total + length, length
                hi += 1
            lo = start
            while lo > 0 and hi - lo < rows_cap:  # shorter rows: the longest stays
                length = bin_[lo - 1] >> _SHIFT
                if (hi - lo + 1) * longest > mt if padded else total + length > mt:
                    break
                total += length
                lo -= 1
        keys = bin_[lo:hi]
        del bin_[lo:hi]
        self.held -= len(keys)
        self.tokens[i] -= total
        self.longest[i] = bin_[-1] >> _SHIFT if bin_ else 0
        return keys

    def _emit(self) -> list[Any]:
        """One batch from the buffer (step 3 of the class docstring). Plain Python over the
        bins' counters: it runs once per batch, and numpy's per-call cost would dominate."""
        counts = [len(bin_) for bin_ in self.bins]
        full = [c if c and self._over(c, t, m) else 0 for c, t, m in zip(counts, self.tokens, self.longest)]
        if not any(full):  # no bin holds a whole batch: the fullest
            top = max(counts)
            full = [c if c == top else 0 for c in counts]
        if self.b.shuffle:  # a bin with chance proportional to its rows, then a start in it
            u, v = self.rng.random(2).tolist()
            cum = list(itertools.accumulate(full))
            i = bisect.bisect_right(cum, u * cum[-1])
            start = int(v * counts[i])
        else:
            i, start = full.index(max(full)), 0
        return self._rows(self._cut(i, start))

    def _rows(self, keys: list[int]) -> list[Any]:
        pop = self.rows.pop
        return [pop(k & _POS) for k in reversed(keys)]  # a run of an ascending bin: longest first

    def _drain(self) -> None:
        """Cut every bin into batches and order them (step 5)."""
        if self.edges is None:
            self._estimate_bins()
        batches = []
        for i, bin_ in enumerate(self.bins):
            while bin_:
                batches.append(self._rows(self._cut(i, 0)))
        order = self.rng.permutation(len(batches)) if self.b.shuffle else range(len(batches))
        self.tail = [batches[i] for i in order]

    def run(self) -> Iterator[list[Any]]:
        """The pass's batches. The per-row loop is written flat (locals, no call per row):
        it is the batcher's whole cost per stream item."""
        b = self.b
        if not self.done:
            key, cap, size, num_shards, shard = b.key, b.max_tokens or float("inf"), b.buffer_size, self.num_shards, self.shard
            rows, unsorted, bisect_left = self.rows, self.unsorted, bisect.bisect_left
            while self.edges is not None and self.held >= size:  # a resumed pass stopped between these batches
                yield self._emit()
            pos, held = self.consumed - 1, self.held
            edges, bins, tokens, longest = self.edges, self.bins, self.tokens, self.longest
            last = len(edges or ()) - 1
            for pos, row in enumerate(self._items(), self.consumed):  # self.consumed is kept up to date at each yield
                if num_shards > 1 and pos % num_shards != shard:
                    continue
                n = len(row[key]) if isinstance(row, dict) else len(row)
                if n > cap:
                    raise ValueError(f"stream item {pos} has {n} tokens, more than max_tokens={b.max_tokens}")
                rows[pos] = row
                held += 1
                if edges is None:
                    self.sample.append(n << _SHIFT | pos)
                    if len(self.sample) < b.bin_sample:
                        continue
                    self.held = held
                    self._estimate_bins()
                    edges, bins, tokens, longest = self.edges, self.bins, self.tokens, self.longest
                    last = len(edges) - 1
                else:
                    i = bisect_left(edges, n)  # as self._add
                    if i > last:
                        i = last
                    bins[i].append(n << _SHIFT | pos)
                    unsorted.add(i)
                    tokens[i] += n
                    if n > longest[i]:
                        longest[i] = n
                if held >= size:
                    self.held = held
                    while self.held >= size:
                        self.consumed = pos + 1
                        yield self._emit()
                    held = self.held
            self.held = held
            self.consumed = pos + 1
            self.done = True
            self._drain()
        while self.tail:
            yield self.tail.pop(0)


def until_first_rank_ends(batches: Iterable[Any], group=None) -> Iterator[Any]:
    """Yield ``batches`` while every rank still has one: the uneven end of a streamed epoch.

    Each step all-reduces one flag (``MIN`` of "I have a batch"), so all ranks stop
    together at the first rank's end instead of one waiting forever in a collective;
    the batches other ranks still held are dropped for this epoch (the next epoch draws
    anew). A trainer that all-reduces per step already can fold the flag into that call.
    Without an initialised process group (or with one rank) it passes ``batches`` through.

    Args:
        batches: this rank's batches (e.g. a ``DataLoader`` over a :class:`StreamBucketBatcher`).
        group: the process group (``None``: the default one).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        yield from batches
        return
    it = iter(batches)
    while True:
        batch = next(it, _END)
        flag = torch.tensor([0 if batch is _END else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        if not flag.item():
            return
        yield batch


_END = object()


# --------------------------------------------------------------------------- a streamed source


def stream_splits(cfg, tokenizer=None, *, sample_lines: int | None = None) -> dict[str, Iterable[dict]]:
    """Encoded rows per split, read with ``datasets.load_dataset(..., streaming=True)``.

    Nothing is written: each split is a Hugging Face ``IterableDataset`` whose rows are
    ``{"input_ids": [<bos>, ids..., <eos>]}`` (the convention of ``pipeline.prepare``),
    encoded on the fly with ``tokenizers``' ``encode_batch_fast`` in batches of
    ``cfg.batch_size`` lines. Feed a split to :class:`StreamBucketBatcher`.

    Args:
        cfg: the recipe's ``data:`` section (``pipeline.config.DataConfig``); its
            ``source`` is a hub id or local files, ``text_column``, ``mode``, ``errors``
            and ``tokenizer`` are honoured. ``max_len``/``overflow`` apply per row
            (``split`` windows overlap by one id, as in ``pipeline.prepare``).
        tokenizer: a ``tokenizers.Tokenizer``; ``None`` loads ``cfg.tokenizer.path`` or,
            if that is unset, trains ``cfg.tokenizer`` on the first ``sample_lines``
            lines of the train stream.
        sample_lines: lines of train a tokenizer is trained on when none is given
            (``None``: ``cfg.stream.sample_lines``).

    Returns:
        ``{"train": ..., "validation": ..., "test": ...}`` for the splits the source has
        (no validation split is held out: a stream has no random access). To get the
        tokenizer too (its ``<pad>`` id, its vocabulary size), use :func:`open_stream`.
    """
    return open_stream(cfg, tokenizer, sample_lines=sample_lines)[0]


def open_stream(cfg, tokenizer=None, *, sample_lines: int | None = None):
    """Like :func:`stream_splits`, also returning the tokenizer (to save next to checkpoints).

    Returns:
        ``(splits, tokenizer)``.
    """
    import datasets

    from pipeline.errors import UserError
    from pipeline.prepare import _SPLIT_STEMS, _build_tokenizer, _check_hub, _local_splits, _special_ids

    if cfg.source.hub:
        _check_hub(cfg.source.hub)
        try:
            dd = datasets.load_dataset(cfg.source.hub, cfg.source.name, revision=cfg.source.revision, streaming=True)
        except Exception as e:  # the hub raises many types; all mean "could not load"
            raise UserError(f"could not stream {cfg.source.hub} ({cfg.source.name}): {str(e).splitlines()[0]}") from None
        raw = {split: dd[name] for split, stems in _SPLIT_STEMS.items() for name in stems if name in dd}
    else:
        raw = {}
        for split, src in _local_splits(cfg).items():
            kwargs: dict = {"encoding": "utf-8-sig", "encoding_errors": "replace" if cfg.errors == "replace" else "strict"}
            if src.builder == "text":
                kwargs["sample_by"] = "line" if cfg.mode == "line" else "paragraph"
            elif src.builder == "parquet":
                kwargs = {}
            raw[split] = datasets.load_dataset(src.builder, data_files={split: [str(f) for f in src.files]}, split=split,
                                               streaming=True, **kwargs)
    if "train" not in raw:
        raise UserError("the streamed source has no train split")
    col = cfg.text_column
    if tokenizer is None:
        if cfg.tokenizer.path is None:
            first = list(itertools.islice(iter(raw["train"]), sample_lines or cfg.stream.sample_lines))
            if first and col not in first[0]:
                raise UserError(f"the train stream has no column {col!r} (columns: {', '.join(first[0])}); set data.text_column")
            sample = datasets.Dataset.from_dict({col: [r[col] for r in first]})
            tokenizer = _build_tokenizer(cfg, sample, col, quiet=True)
        else:
            tokenizer = _build_tokenizer(cfg, None, col, quiet=True)
    ids = _special_ids(tokenizer, where="tokenizer")
    encode = _StreamEncoder(tokenizer, col, ids["<bos>"], ids["<eos>"], cfg.max_len, cfg.overflow)
    # every source column goes: a row may become several (overflow=split), which other columns could not follow
    out = {split: ds.map(encode, batched=True, batch_size=cfg.batch_size, remove_columns=list(ds.column_names or [col]))
           for split, ds in raw.items()}
    return out, tokenizer


class _StreamEncoder:
    """``IterableDataset.map`` function: text → ``<bos> ids <eos>`` rows, ``max_len`` applied."""

    def __init__(self, tokenizer, column: str, bos: int, eos: int, max_len: int | None, overflow: str) -> None:
        self.tokenizer, self.column, self.bos, self.eos = tokenizer, column, bos, eos
        self.max_len, self.overflow = max_len, overflow

    def __call__(self, batch: dict) -> dict:
        texts = [t if t is not None else "" for t in batch[self.column]]
        rows = [[self.bos, *e.ids, self.eos] for e in self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        m = self.max_len
        if m is None:
            return {"input_ids": rows}
        out = []
        for ids in rows:
            if len(ids) <= m:
                out.append(ids)
            elif self.overflow == "truncate":
                out.append(ids[:m])
            elif self.overflow == "split":  # windows overlap by one id, as in pipeline.prepare
                out.extend(ids[s : s + m] for s in range(0, len(ids) - 1, m - 1))
        return {"input_ids": out}
