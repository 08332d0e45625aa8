"""The batch sources: one split as the trainer and the evaluator read it.

Every source satisfies :class:`BatchSource`: it yields ``(batch, lr_scale)`` pairs for the
rest of an epoch, knows where in the epoch it is, and saves and restores that position.
Three kinds, one per way of reading data:

* :class:`SequenceBatches` (``train.mode: sequence``): every prepared row (a line, a
  document) is an independent sequence from a zero state, batched by length
  (:class:`pipeline.sampling.BucketBatchSampler`);
* :class:`WindowBatches` (``train.mode: stream``): each split is one continuous text cut
  into ``batch_size`` streams read in windows of ``bptt`` tokens
  (:class:`pipeline.bptt.StreamWindows`); each window continues the one before, so the
  model's state is carried across. The protocol published WikiText-2 / PTB perplexities use;
* :class:`StreamedBatches` (``data.stream.enabled``): rows read with ``streaming=True`` and
  encoded on the fly, length-bucketed in a bounded buffer
  (:class:`pipeline.streaming.StreamBucketBatcher`); no prepared copy, epoch length unknown.

:func:`open_splits` opens a recipe's splits (preparing the data first if it must).
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any, Protocol

from lm.checkpoint import Key
from lm.config import Recipe, TrainConfig
from lm.distributed import Dist
from pipeline.bptt import StreamWindows
from pipeline.collate import PackedBatch, PackedCollator
from pipeline.data import TokenDataset, make_loader, read_manifest
from pipeline.errors import UserError
from pipeline.typed_yaml import to_dict


class BatchSource(Protocol):
    """One split, read batch by batch (per rank).

    Attributes:
        carries_state: each batch continues the previous batch's sequences, so the
            model's final state is carried into the next batch (and saved with a checkpoint).
        per_rank_state: :meth:`state_dict` differs per rank and is saved for every rank
            (a streamed source's buffer), rather than once (a plan every rank can recompute).
        epoch_length: batches per epoch on this rank; ``None`` until a pass has been read
            (a streamed source).
        num_tokens: predicted tokens in the split (all ranks); ``None`` when unknown.
        position: batches of the current epoch already yielded.
    """

    carries_state: bool
    per_rank_state: bool
    epoch_length: int | None
    num_tokens: int | None
    position: int

    def set_epoch(self, epoch: int) -> None:
        """Start (or, after :meth:`load_state_dict`, continue) epoch ``epoch``."""

    def __iter__(self) -> Iterator[tuple[PackedBatch, float]]:
        """The rest of the epoch: ``(batch, lr_scale)``, the scale 1.0 unless windows vary in length."""

    def global_tokens(self, step: int, batch: PackedBatch, world: int) -> int:
        """Predicted tokens of this epoch's step ``step`` summed over all ranks (``batch`` is this rank's)."""

    def state_dict(self, consumed: int) -> dict:
        """The position after ``consumed`` batches of the epoch, as plain data."""

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict`."""


class SequenceBatches:
    """Length-bucketed batches of independent rows (no state carried)."""

    carries_state = False
    per_rank_state = False

    def __init__(self, ds: TokenDataset, cfg: TrainConfig, d: Dist, *, train: bool, pin: bool) -> None:
        longest = int(ds.lengths.max())
        if cfg.max_tokens is not None and cfg.max_tokens < longest:
            raise UserError(
                f"train.max_tokens={cfg.max_tokens} is smaller than the longest {ds.split} sequence ({longest} ids); "
                f"raise it, or cap sequences with data.max_len"
            )
        try:
            self.loader = make_loader(ds, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, shuffle=train,
                                      seed=cfg.seed, num_workers=cfg.num_workers, pin_memory=pin,
                                      num_replicas=d.world, rank=d.rank)
        except ValueError as e:
            raise UserError(f"{ds.split} split: {e}") from None
        self.sampler = self.loader.batch_sampler
        self.epoch_length = len(self.sampler)
        self.num_tokens = ds.num_tokens

    @property
    def position(self) -> int:
        return self.sampler.position

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # keeps a restored mid-epoch position

    def __iter__(self) -> Iterator[tuple[PackedBatch, float]]:
        for batch in self.loader:
            yield batch, 1.0

    def global_tokens(self, step: int, batch: PackedBatch, world: int) -> int:
        """From the sampler's plan (a pure function of lengths, seed and epoch): no collective needed."""
        sequences, tokens = self.sampler.global_counts(step)
        return tokens - sequences  # the collator's shift: one target fewer per sequence

    def state_dict(self, consumed: int) -> dict:
        return self.sampler.state_dict(batches_consumed=consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class WindowBatches:
    """Windows of ``bptt`` tokens over ``B`` parallel streams (state carried)."""

    carries_state = True
    per_rank_state = False

    def __init__(self, ds: TokenDataset, cfg: TrainConfig, d: Dist, *, train: bool, pin: bool) -> None:
        streams = cfg.batch_size if train else cfg.eval_batch_size
        try:
            self.windows = StreamWindows(ds, streams, cfg.bptt, exact=not train, variable=train and cfg.variable_bptt,
                                         seed=cfg.seed, num_replicas=d.world, rank=d.rank)
        except ValueError as e:
            key = "train.batch_size" if train else "train.eval_batch_size"
            raise UserError(f"{key}={streams} ({ds.split} split, stream mode): {e}") from None
        self.bptt, self.pin = cfg.bptt, pin
        self.collate = PackedCollator(pad_id=0)
        self.epoch_length = len(self.windows)
        self.num_tokens = ds.num_tokens

    @property
    def position(self) -> int:
        return self.windows.position

    def set_epoch(self, epoch: int) -> None:
        self.windows.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[PackedBatch, float]]:
        for window in self.windows:
            batch = self.collate(window)
            # AWD-LSTM scales the learning rate by a variable window's length / bptt
            scale = (len(window[0]) - 1) / self.bptt if self.windows.variable else 1.0
            yield (batch.pin_memory() if self.pin else batch), scale

    def global_tokens(self, step: int, batch: PackedBatch, world: int) -> int:
        return batch.num_tokens * world  # every rank's window is equal

    def state_dict(self, consumed: int) -> dict:
        return self.windows.state_dict(windows_consumed=consumed)

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)


class StreamedBatches:
    """Rows of a streamed source, length-bucketed in a bounded buffer (no state carried).

    The batches of an epoch are not known ahead, so under DDP each step sums the token
    count over ranks and every rank stops at the first rank's end of the epoch (the few
    batches the others still held are left for that epoch, as
    ``pipeline.streaming.until_first_rank_ends`` does); evaluation reads every row.
    """

    carries_state = False
    per_rank_state = True  # each rank's batcher holds its own shard's buffer
    epoch_length = None
    num_tokens = None

    def __init__(self, rows, cfg: TrainConfig, d: Dist, *, train: bool, pin: bool, buffer_size: int) -> None:
        from pipeline.streaming import StreamBucketBatcher

        self.batcher = StreamBucketBatcher(rows, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                                           buffer_size=buffer_size, shuffle=train, seed=cfg.seed,
                                           num_replicas=d.world, rank=d.rank)
        self.train, self.pin, self.d = train, pin, d
        self.collate = PackedCollator(pad_id=0)
        self.position = 0  # batches of this epoch yielded (restored by load_state_dict)
        self._resume = False

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.batcher.epoch:
            self.position, self._resume = 0, False
        self.batcher.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[PackedBatch, float]]:
        if not self._resume:
            self.position = 0
        self._resume = False
        # held here and read with next(), never delegated to: a stop mid-epoch closes this
        # generator, and closing the batcher's pass too would drop the position a checkpoint records
        self._pass = iter(self.batcher)
        while True:
            rows = next(self._pass, None)
            if self.train and self.d.world > 1:  # the uneven end: every rank stops at the first rank's end
                (ended,) = self.d.all_max(float(rows is None))
                if ended:
                    return
            if rows is None:
                return
            self.position += 1
            batch = self.collate(rows)
            yield (batch.pin_memory() if self.pin else batch), 1.0

    def global_tokens(self, step: int, batch: PackedBatch, world: int) -> int:
        (tokens,) = self.d.all_sum(batch.num_tokens)  # the other ranks' batches are not known here
        return int(tokens)

    def state_dict(self, consumed: int) -> dict:
        return {"batcher": self.batcher.state_dict(), "batches": consumed}

    def load_state_dict(self, state: dict) -> None:
        self.batcher.load_state_dict(state["batcher"])
        self.position, self._resume = int(state["batches"]), True


def batch_source(ds: TokenDataset, cfg: TrainConfig, d: Dist, *, train: bool, pin: bool) -> BatchSource:
    """A prepared split read in ``cfg.mode``'s protocol (training order if ``train``, else in order)."""
    kind = WindowBatches if cfg.mode == "stream" else SequenceBatches
    return kind(ds, cfg, d, train=train, pin=pin)


def open_splits(recipe: Recipe, d: Dist, pin: bool) -> tuple[dict[str, BatchSource], dict[str, Any]]:
    """The recipe's splits as batch sources, and what checkpoints record of the data.

    Returns:
        ``(splits, meta)``: ``{"train": ..., "validation": ..., ["test": ...]}`` and the
        checkpoint fields of the data (tokenizer JSON, special ids, vocabulary size, fingerprint).
    """
    if recipe.data.stream.enabled:
        return _open_streamed(recipe, d, pin)
    manifest = _prepared(recipe, d)
    folder = recipe.data.output
    splits = {name: batch_source(TokenDataset(folder, name), recipe.train, d, train=name == "train", pin=pin)
              for name in ("train", "validation", "test") if name in manifest["splits"]}
    meta = {Key.TOKENIZER: (folder / "tokenizer.json").read_text(encoding="utf-8"),
            Key.SPECIAL_IDS: manifest["special_ids"], Key.VOCAB_SIZE: manifest["vocab_size"],
            Key.DATA_FINGERPRINT: manifest["fingerprint"]}
    return splits, meta


def _open_streamed(recipe: Recipe, d: Dist, pin: bool) -> tuple[dict[str, BatchSource], dict[str, Any]]:
    from pipeline.tokenizer import special_ids
    from pipeline.streaming import open_stream

    cfg = recipe.train
    if cfg.mode == "stream":
        raise UserError("train.mode=stream reads prepared data (each split as one indexed stream); with "
                        "data.stream.enabled=true use train.mode=sequence, or prepare the data first")
    rows, tokenizer = open_stream(recipe.data)
    if "validation" not in rows:
        raise UserError("the streamed source has no validation split (a stream cannot hold one out); "
                        "give data.source.files.validation, or a folder with a valid file")
    splits = {name: StreamedBatches(r, cfg, d, train=name == "train", pin=pin,
                                    buffer_size=recipe.data.stream.buffer_size) for name, r in rows.items()}
    data = json.dumps(to_dict(recipe.data), sort_keys=True, default=str)
    meta = {Key.TOKENIZER: tokenizer.to_str(),
            Key.SPECIAL_IDS: {k.strip("<>"): v for k, v in special_ids(tokenizer, "tokenizer").items()},
            Key.VOCAB_SIZE: tokenizer.get_vocab_size(),
            Key.DATA_FINGERPRINT: hashlib.sha256(data.encode()).hexdigest()[:16]}
    return splits, meta


def _prepared(recipe: Recipe, d: Dist) -> dict:
    """Run ``pipeline.prepare`` when the prepared data is missing or stale (rank 0 only); the manifest."""
    if d.main:
        from pipeline.prepare import prepare  # datasets/tokenizers are imported only if it must build

        prepare(recipe.data)
    d.barrier()
    return read_manifest(recipe.data.output)
