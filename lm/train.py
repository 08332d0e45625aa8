"""Train a GRU/LSTM language model: ``python -m lm.train RECIPE [key=value ...]``.

The run reads top to bottom in :func:`_run`::

    setup       recipe → processes → device → data → model, optimiser, schedules → resume
    loop        per step: _step (forward, backward, clip, update)
                          _after_step (log, validate, checkpoint, stop?)
                per epoch end: _end_of_epoch (validate, samples, next epoch)
    finish      final validation if stale → test perplexity of the best weights → result.json

Two protocols (``train.mode``), one model call and one loss:

* ``sequence``: every prepared row (a line, a document) is an independent sequence from
  a zero state, batched by length (:class:`pipeline.sampling.BucketBatchSampler`).
* ``stream``: each split is one continuous text cut into ``batch_size`` streams read in
  windows of ``bptt`` tokens (:class:`pipeline.bptt.StreamWindows`); each window starts
  from the detached final state of the one before. This is the protocol published
  WikiText-2 / PTB perplexities use.

Perplexity is ``exp(total NLL / predicted tokens)``; on WikiText-2 the predicted tokens
are the words plus one ``<eos>`` per line in both protocols, the published counts.

Distributed: ``torchrun --nproc_per_node N -m lm.train RECIPE`` (gloo on CPU, NCCL on
CUDA). Each rank gets its own batches (or its own streams), gradients are averaged by
DDP, evaluation sums are reduced across ranks, and only rank 0 logs and writes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lm import checkpoint, precision, rundir
from lm.averaging import WeightAverage
from lm.device import resolve_device
from lm import state as st
from lm.config import Recipe, TrainConfig, load
from lm.model import RNNLM, build_model
from lm.precision import Precision
from lm.runtime import release_free_memory, tune_allocator
from lm.schedule import LRSchedule, teacher_forcing_ratio
from pipeline.bptt import StreamWindows
from pipeline.collate import PackedBatch, PackedCollator
from pipeline.config import to_dict
from pipeline.data import TokenDataset, make_loader, read_manifest
from pipeline.errors import ArgumentParser, UserError, cli

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "wikitext.yaml"
# Under DDP the ranks agree on stopping and on the clock every this many steps (one
# small all_reduce); in one process the check is every step and costs nothing.
_AGREE_EVERY = 10


# --------------------------------------------------------------------------- processes and devices


@dataclass
class Dist:
    """This process's place in the run (world 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over ranks (float64, exact for token counts)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def all_max(self, *values: float) -> list[float]:
        """The largest value of each number over ranks (flags, clocks)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all_gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def _init_distributed(device_name: str) -> Dist:
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(d.local_rank)
    # all_sum reduces CPU tensors, which NCCL alone cannot: gloo takes those, NCCL the CUDA ones
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return d


# --------------------------------------------------------------------------- data: the two protocols


class _SequenceData:
    """Sequence mode: length-bucketed batches of independent rows (no state carried)."""

    carries_state = False

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
        self.num_tokens = ds.num_tokens

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def position(self) -> int:
        return self.sampler.position

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)  # keeps a restored mid-epoch position

    def __iter__(self) -> Iterator[tuple[PackedBatch, float]]:
        """The rest of the epoch: ``(batch, lr scale)``."""
        for batch in self.loader:
            yield batch, 1.0

    def global_tokens(self, step: int, batch: PackedBatch, world: int) -> int:
        """Predicted tokens of step ``step`` of the epoch over all ranks, from the sampler's
        plan (a pure function of lengths, seed and epoch): no collective needed."""
        sequences, tokens = self.sampler.global_counts(step)
        return tokens - sequences  # the collator's shift: one target fewer per sequence

    def state_dict(self, consumed: int) -> dict:
        return self.sampler.state_dict(batches_consumed=consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


class _StreamData:
    """Stream mode: windows of ``bptt`` tokens over ``B`` parallel streams (state carried)."""

    carries_state = True

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
        self.num_tokens = ds.num_tokens

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def position(self) -> int:
        return self.windows.position

    def set_epoch(self, epoch: int) -> None:
        self.windows.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[PackedBatch, float]]:
        """The rest of the epoch: ``(window, lr scale)``; AWD-LSTM scales lr by length / bptt."""
        for window in self.windows:
            batch = self.collate(window)
            scale = (len(window[0]) - 1) / self.bptt if self.windows.variable else 1.0
            yield (batch.pin_memory() if self.pin else batch), scale

    def global_tokens(self, step: int, batch: PackedBatch, world: int) -> int:
        """Predicted tokens of a training window over all ranks: every rank's window is equal."""
        return batch.num_tokens * world

    def state_dict(self, consumed: int) -> dict:
        return self.windows.state_dict(windows_consumed=consumed)

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state)


class _StreamedData:
    """A streamed source (``data.stream.enabled``): rows read with ``streaming=True`` and
    encoded on the fly, length-bucketed in a bounded buffer (``StreamBucketBatcher``); no
    prepared copy. Sequence mode only. The batches of an epoch are not known ahead, so
    under DDP each step sums the token count over ranks and every rank stops at the
    first rank's end of the epoch (the few batches the others still held are left for
    that epoch, as ``pipeline.streaming.until_first_rank_ends`` does); evaluation reads every row."""

    carries_state = False
    per_rank_state = True  # each rank's batcher holds its own shard's buffer

    def __init__(self, rows, cfg: TrainConfig, d: Dist, *, train: bool, pin: bool, buffer_size: int) -> None:
        from pipeline.streaming import StreamBucketBatcher

        self.batcher = StreamBucketBatcher(rows, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size,
                                           buffer_size=buffer_size, shuffle=train, seed=cfg.seed,
                                           num_replicas=d.world, rank=d.rank)
        self.train, self.pin, self.d = train, pin, d
        self.collate = PackedCollator(pad_id=0)
        self.position = 0  # batches of this epoch yielded (restored by load_state_dict)
        self._resume = False
        self.num_tokens = None  # known once a pass has been read

    def __len__(self) -> int:
        return 0  # unknown until the epoch's stream has been read

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


def _data(ds: TokenDataset, cfg: TrainConfig, d: Dist, *, train: bool, pin: bool) -> _SequenceData | _StreamData:
    kind = _StreamData if cfg.mode == "stream" else _SequenceData
    return kind(ds, cfg, d, train=train, pin=pin)


def _open_data(recipe: Recipe, d: Dist, pin: bool) -> tuple[dict, dict]:
    """The splits as the trainer reads them, and what checkpoints record of the data
    (tokenizer JSON, special ids, vocabulary size, fingerprint)."""
    cfg = recipe.train
    if recipe.data.stream.enabled:
        return _open_streamed(recipe, d, pin)
    manifest = _prepare_data(recipe, d)
    folder = recipe.data.output
    splits = {name: _data(TokenDataset(folder, name), cfg, d, train=name == "train", pin=pin)
              for name in ("train", "validation", "test") if name in manifest["splits"]}
    meta = {"tokenizer": (folder / "tokenizer.json").read_text(encoding="utf-8"),
            "special_ids": manifest["special_ids"], "vocab_size": manifest["vocab_size"],
            "data_fingerprint": manifest["fingerprint"]}
    return splits, meta


def _open_streamed(recipe: Recipe, d: Dist, pin: bool) -> tuple[dict, dict]:
    from pipeline.streaming import open_stream
    from pipeline.prepare import _special_ids

    cfg = recipe.train
    if cfg.mode == "stream":
        raise UserError("train.mode=stream reads prepared data (each split as one indexed stream); with "
                        "data.stream.enabled=true use train.mode=sequence, or prepare the data first")
    rows, tokenizer = open_stream(recipe.data)
    if "validation" not in rows:
        raise UserError("the streamed source has no validation split (a stream cannot hold one out); "
                        "give data.source.files.validation, or a folder with a valid file")
    splits = {name: _StreamedData(r, cfg, d, train=name == "train", pin=pin,
                                  buffer_size=recipe.data.stream.buffer_size) for name, r in rows.items()}
    data = json.dumps(to_dict(recipe.data), sort_keys=True, default=str)
    meta = {"tokenizer": tokenizer.to_str(),
            "special_ids": {k.strip("<>"): v for k, v in _special_ids(tokenizer, "tokenizer").items()},
            "vocab_size": tokenizer.get_vocab_size(), "data_fingerprint": hashlib.sha256(data.encode()).hexdigest()[:16]}
    return splits, meta


def _prepare_data(recipe: Recipe, d: Dist) -> dict:
    """Run ``pipeline.prepare`` when the prepared data is missing or stale (rank 0 only)."""
    if d.main:
        from pipeline.prepare import prepare  # datasets/tokenizers are imported only if it must build

        prepare(recipe.data)
    if d.world > 1:
        dist.barrier()
    return read_manifest(recipe.data.output)


# --------------------------------------------------------------------------- model and optimiser


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on biases
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: RNNLM, data, device: torch.device, d: Dist, policy: Precision | None = None) -> tuple[float, int]:
    """Summed NLL and predicted tokens over a whole split, across all ranks.

    ``data`` yields ``(batch, _)`` pairs (the trainer's data objects) or plain batches
    (a ``DataLoader``). With ``data.carries_state`` (stream mode) each window starts from
    the previous window's final state, as the published protocol does. The NLL is summed
    on the device: one host sync per split, not per batch.

    Returns:
        ``(nll_sum, tokens)``; perplexity is ``exp(nll_sum / tokens)``.
    """
    was = model.training
    model.eval()
    release_free_memory()  # training's blocks differ in size from evaluation's: hand them back first
    carry = getattr(data, "carries_state", False)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    state = None
    for item in data:
        batch = item[0] if isinstance(item, tuple) else item
        batch = batch.to(device, non_blocking=True)
        if state is not None and st.hidden(state).size(1) > len(batch.lengths):
            state = st.narrow(state, len(batch.lengths))  # exhausted streams drop off the end
        with policy.autocast() if policy is not None else contextlib.nullcontext():
            out = model(batch, state, need_state=carry, need_logits=False)
        state = out.state if carry else None
        nll += out.nll_sum.double()
        tokens += out.num_tokens
    model.train(was)
    release_free_memory()  # and evaluation's before training goes on
    nll, tokens = d.all_sum(float(nll), tokens)
    return nll, int(tokens)


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(min(nll / max(tokens, 1), 700.0))


# --------------------------------------------------------------------------- the run's state


@dataclass
class Progress:
    """Everything that moves during training and must survive a restart."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # batches (windows) of this epoch trained on
    tokens: int = 0  # cumulative predicted tokens trained on (all ranks)
    best_val: float = math.inf
    last_val_step: int = -1  # validation runs at most once per step
    last_val_loss: float = math.inf
    val_tokens: int = 0  # predicted tokens of the validation split (as last evaluated)
    nonfinite: int = 0  # non-finite steps in a row
    skipped: int = 0  # non-finite steps in total
    elapsed: float = 0.0  # training seconds, agreed by all ranks


class _Stop:
    """SIGINT / SIGTERM: acknowledged at once, then a checkpoint after the current step.

    A second signal stops now (``KeyboardInterrupt``); checkpoints are written
    atomically, so the last good one stays intact.
    """

    def __init__(self, announce: bool) -> None:
        self.signum = 0
        self.announce = announce
        self._first = 0.0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum:
            # torchrun forwards the terminal's Ctrl-C to workers that already got it: a copy
            # within a second is the same stop; a second Ctrl-C after that stops now
            if time.monotonic() - self._first < 1.0:
                return
            raise KeyboardInterrupt
        self.signum, self._first = signum, time.monotonic()
        if self.announce:
            os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step; saving a checkpoint… "
                        f"(again to stop at once)\n".encode())

    def agree(self, signum: int) -> None:
        """Another rank got a stop signal: stop here too (this rank's own copy may follow)."""
        if signum and not self.signum:
            self.signum, self._first = signum, time.monotonic()


@dataclass
class _Run:
    """What setup builds; the loop below reads and advances it."""

    recipe: Recipe
    d: Dist
    device: torch.device
    model: RNNLM
    ddp: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_at: LRSchedule
    train: _SequenceData | _StreamData
    val: _SequenceData | _StreamData
    test: _SequenceData | _StreamData | None
    meta: dict
    out_dir: Path
    metrics: "_Metrics"
    report: "_Reporter"
    stop: _Stop
    p: Progress = field(default_factory=Progress)
    policy: Precision | None = None  # mixed precision (lm/precision.py)
    scaler: torch.amp.GradScaler | None = None  # fp16 only; a pass-through otherwise
    average: WeightAverage | None = None  # NT-ASGD's running mean of the weights
    carry: tuple | None = None  # stream mode: the detached state carried into the next window
    clock0: float = 0.0  # perf_counter at the (re)start, minus the elapsed time restored
    window: dict = field(default_factory=dict)  # train loss summed on the device since the last log

    @property
    def cfg(self) -> TrainConfig:
        return self.recipe.train

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


# --------------------------------------------------------------------------- the run


def run(recipe: Recipe, *, argv: list[str] = ()) -> dict:
    """Train per the recipe; returns the final metrics (perplexities, steps, tokens).

    Raises:
        UserError: any problem with the recipe, data or checkpoint.
    """
    d = _init_distributed(recipe.train.device)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        device = resolve_device(recipe.train.device, d.local_rank, world=d.world)
        try:
            policy = precision.for_device(recipe.train.amp, device)
        except ValueError as e:
            raise UserError(f"train.amp: {e}") from None
        # rank 0 owns the output folder for the whole run (lm/rundir.py); a refusal comes
        # before anything is written, and every rank stops with it
        owner = _agreed(d, lambda: rundir.claim(recipe.train.output_dir, resume=recipe.train.resume,
                                                recipe=to_dict(recipe)) if d.main else None)
        with owner or contextlib.nullcontext():
            return _run(recipe, d, device, policy, argv, owner)
    finally:
        for s, h in handlers.items():  # _Stop's handlers must not outlive the run (notebooks, tests)
            if h is not None:
                signal.signal(s, h)
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _agreed(d: Dist, fn):
    """``fn()`` on every rank; if it raises a ``UserError`` on any rank, it raises on all of
    them (a decision taken on rank 0 alone must not leave the others waiting)."""
    error = None
    try:
        value = fn()
    except UserError as e:
        value, error = None, str(e)
    errors = [e for e in d.all_gather(error) if e]
    if errors:
        raise UserError(errors[0])
    return value


def _run(recipe: Recipe, d: Dist, device: torch.device, policy: Precision, argv,
         owner: rundir.RunDir | None) -> dict:
    r = _setup(recipe, d, device, policy, owner)
    reason = _already_done(r)  # a finished run resumed again (a requeued job) trains no further
    while reason is None:
        r.train.set_epoch(r.p.epoch)
        r.p.consumed = r.train.position  # 0, or where a resumed epoch stopped
        for batch, lr_scale in r.train:
            _step(r, batch, lr_scale)
            reason = _after_step(r)
            if reason:
                break
        else:
            reason = _end_of_epoch(r)
        _save(r, reason or "epoch")
    r.report.close()
    _check_replicas(r.model, d)
    if reason == "signal":
        _exit_on_signal(r, argv)
    return _finish(r, reason, argv)


def _setup(recipe: Recipe, d: Dist, device: torch.device, policy: Precision, owner: rundir.RunDir | None) -> _Run:
    cfg = recipe.train
    torch.manual_seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)

    splits, data_meta = _open_data(recipe, d, pin=device.type == "cuda")
    train, val, test = splits["train"], splits["validation"], splits.get("test")

    model = build_model(recipe.model, data_meta["vocab_size"]).to(device)
    policy.apply(model)  # the output layer in the policy's dtype, before DDP wraps it
    ddp = model
    if d.world > 1:
        # an adaptive softmax's tail cluster gets no gradient on a rank whose batch has no target in it
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=model.may_leave_parameters_unused)
    optimizer = _optimizer(model, cfg)
    average = None
    if cfg.average != "off":
        average = WeightAverage(model, nonmono=cfg.nonmono if cfg.average == "nonmono" else None)
    meta = {"recipe": to_dict(recipe), **data_meta, **(owner.checkpoint_fields() if owner else {})}
    out_dir = cfg.output_dir
    r = _Run(recipe=recipe, d=d, device=device, model=model, ddp=ddp, optimizer=optimizer, lr_at=LRSchedule(cfg),
             train=train, val=val, test=test, meta=meta, out_dir=out_dir, metrics=None, report=None,
             stop=_Stop(announce=d.main), average=average, policy=policy, scaler=policy.grad_scaler())
    resumed = _agreed(d, lambda: _resume(r, owner))
    if owner is not None:
        owner.start()
    if average is not None and cfg.average == "always" and not resumed:
        average.start(0)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(_yaml(to_dict(recipe)))
        per_epoch = (f"{len(train):,} {'windows' if cfg.mode == 'stream' else 'batches'}/epoch/rank" if len(train)
                     else "streamed source (epoch length unknown)")
        print(f"{model.num_parameters():,} parameters | {cfg.mode} mode | {per_epoch} | device {device}"
              f"{f' | world {d.world}' if d.world > 1 else ''}"
              f"{f' | resumed from {resumed} at step {r.p.step}' if resumed else ''}", file=sys.stderr)
        print(policy.description, file=sys.stderr)
    r.metrics = _Metrics(out_dir / "metrics.jsonl", d.main, append=resumed is not None)
    r.clock0 = time.perf_counter() - r.p.elapsed
    r.report = _Reporter(r)
    r.window = {"nll": 0.0, "tokens": 0, "t": time.perf_counter(), "tok0": r.p.tokens, "last_log": time.perf_counter()}
    r.model.train()
    return r


def _already_done(r: _Run) -> str | None:
    cfg, p = r.cfg, r.p
    if cfg.max_steps and p.step >= cfg.max_steps:
        return "max_steps"
    if cfg.epochs and p.epoch >= cfg.epochs:
        return "epochs"
    if cfg.max_time is not None and p.elapsed >= cfg.max_time:
        return "max_time"
    return None


def _step(r: _Run, batch: PackedBatch, lr_scale: float) -> None:
    """One optimiser step on one batch (per rank). At most one host sync: the finiteness
    of the gradient norm, which every rank decides alike (the gradient is all-reduced)."""
    cfg, p, d = r.cfg, r.p, r.d
    batch = batch.to(r.device, non_blocking=True)
    tf = teacher_forcing_ratio(cfg.teacher_forcing, p.step)
    lr = r.lr_at(p.step, _budget_fraction(r), p.epoch) * lr_scale
    for g in r.optimizer.param_groups:
        g["lr"] = lr
    # loss per real target token of the whole global batch: rank sums / global count, times
    # world because DDP averages gradients over ranks; every rank knows the global count
    global_tokens = r.train.global_tokens(p.consumed, batch, d.world)
    with r.policy.autocast():
        out = r.ddp(batch, r.carry, teacher_forcing=tf, sample=cfg.teacher_forcing.sample,
                    need_state=r.train.carries_state, need_logits=False)
    if r.train.carries_state:
        r.carry = st.detach(out.state)  # truncated BPTT: the state goes on, its graph does not
    # out.reg: AR/TAR, a per-rank mean that DDP's gradient averaging makes the mean over ranks
    loss = out.nll_sum * (d.world / global_tokens) + out.reg
    r.optimizer.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    r.scaler.unscale_(r.optimizer)  # a pass-through unless fp16 (lm/precision.py)
    grad_norm = torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
    if r.policy.scaler:  # fp16: the scaler skips a non-finite step and lowers its scale itself
        r.scaler.step(r.optimizer)
        r.scaler.update()
        if r.average is not None:
            r.average.update()
    elif torch.isfinite(grad_norm):  # the step's one host sync
        r.optimizer.step()
        if r.average is not None:
            r.average.update()
        p.nonfinite = 0
    else:
        p.nonfinite += 1
        p.skipped += 1
        if p.nonfinite >= cfg.max_nonfinite:
            raise UserError(f"loss or gradient not finite for {p.nonfinite} steps in a row at step {p.step}; "
                            f"lower train.lr (now {lr:g}) or raise train.clip")
    p.step += 1
    p.consumed += 1
    p.tokens += int(global_tokens)
    # kept on the device until the next log line
    r.window["nll"] = r.window["nll"] + torch.nan_to_num(out.nll_sum.detach(), nan=0.0, posinf=0.0, neginf=0.0)
    r.window["tokens"] += batch.num_tokens
    r.window.update(lr=lr, tf=tf, grad_norm=grad_norm)
    r.report.step()


def _after_step(r: _Run) -> str | None:
    """Log, validate and checkpoint as due; the reason to stop, if any."""
    cfg, p, d = r.cfg, r.p, r.d
    now = time.perf_counter()
    log_due = now - r.window["last_log"] >= cfg.progress_every
    if d.world == 1 or p.step % _AGREE_EVERY == 0:
        # the ranks agree on the clock (it drives a time-budgeted schedule and max_time),
        # on a stop signal any of them got, and on a time-based log line
        signum, p.elapsed, log_due = d.all_max(r.stop.signum, now - r.clock0, float(log_due))
        r.stop.agree(int(signum))
    else:
        log_due = False
    if p.step % cfg.log_every == 0 or log_due:
        _log_train(r)
    if cfg.eval_every and p.step % cfg.eval_every == 0:
        _validate(r)
    if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
        _save(r, "periodic")
    if r.stop.signum:
        return "signal"
    if cfg.max_time is not None and p.elapsed >= cfg.max_time:
        return "max_time"
    if cfg.max_steps and p.step >= cfg.max_steps:
        return "max_steps"
    return None


def _end_of_epoch(r: _Run) -> str | None:
    p = r.p
    _validate(r)
    _samples(r)
    p.epoch += 1
    p.consumed = 0
    r.carry = None  # stream mode starts every epoch from a zero state, as pytorch/examples does
    if r.cfg.epochs and p.epoch >= r.cfg.epochs:
        return "epochs"
    return None


def _finish(r: _Run, reason: str, argv) -> dict:
    """Final validation if the last one is stale, test perplexity of the best weights."""
    p, d = r.p, r.d
    if reason in ("max_steps", "max_time") and p.consumed:
        _validate(r)
        _samples(r)  # a mid-epoch stop: the epoch's samples never came
    result = {"steps": p.step, "epochs": p.epoch, "tokens": p.tokens, "skipped_steps": p.skipped,
              "mode": r.cfg.mode, "best_val_ppl": math.exp(p.best_val) if p.best_val < math.inf else None,
              "val_tokens": r.val.num_tokens or p.val_tokens, "train_seconds": round(p.elapsed, 1), "stopped_by": reason,
              "parameters": r.model.num_parameters(), "device": str(r.device), "world": d.world,
              "tokens_per_s": round(p.tokens / max(p.elapsed, 1e-9), 1), "command": _launch_command(argv),
              "hardware": _hardware(r.device), "torch": torch.__version__}
    best = r.ckpt_dir / "best.pt"
    # every rank takes the same decision (best_val is reduced identically on all ranks)
    if r.test is not None and p.best_val < math.inf:
        if d.world > 1:
            dist.barrier()  # rank 0 has written best.pt
        r.model.load_state_dict(checkpoint.load(best, map_location=r.device)["model"])
        nll, tokens = evaluate(r.model, r.test, r.device, d, r.policy)
        result["test_ppl"] = _ppl(nll, tokens)
        result["test_tokens"] = tokens
        r.metrics.write({"step": p.step, "split": "test", "loss": nll / tokens, "ppl": result["test_ppl"],
                         "tokens": tokens})
        r.report.say(f"test perplexity {result['test_ppl']:.2f} ({r.cfg.mode} protocol, {tokens:,} tokens)")
    if d.main:
        (r.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if r.cfg.plot:
            _plot(r.out_dir)
        print(json.dumps(result), file=sys.stderr)
    return result


def _exit_on_signal(r: _Run, argv) -> None:
    signum = r.stop.signum
    if r.d.main:
        print(f"{signal.Signals(signum).name}: saved a checkpoint at step {r.p.step} in {r.ckpt_dir}.\n"
              f"Resume with: {_resume_command(argv)}", file=sys.stderr)
    raise SystemExit(128 + signum)


def _hardware(device: torch.device) -> str:
    """One line naming the machine a result was measured on."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    where = f"{os.cpu_count()} cores ({cpu}), {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)} + {where}"
    return where


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _resume_command(argv) -> str:
    """The command that continues this run, as it was launched (torchrun included)."""
    return _launch_command([*argv, "train.resume=auto"])


def _launch_command(argv) -> str:
    """``python -m lm.train ARGS`` as this run was launched (torchrun and its arguments included)."""
    args = shlex.join(argv)
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return f"python -m lm.train {args}"
    nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    launch = f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '1')}"
    if nodes > 1:
        launch += (f" --nnodes {nodes} --rdzv_backend c10d --rdzv_endpoint "
                   f"{os.environ.get('MASTER_ADDR', 'HOST')}:{os.environ.get('MASTER_PORT', '29500')}")
    return f"{launch} -m lm.train {args}"


# --------------------------------------------------------------------------- the pieces the loop calls


def _budget_fraction(r: _Run) -> float:
    """How much of the run's budget is spent, in [0, 1]: the first of epochs, max_steps and
    max_time to run out decides. A cosine schedule ends exactly at the stop this way."""
    cfg, p = r.cfg, r.p
    spent = [0.0]
    if cfg.max_steps:
        spent.append(p.step / cfg.max_steps)
    if cfg.epochs:  # a streamed source's epoch length is unknown: whole epochs only
        spent.append((p.epoch + (p.consumed / len(r.train) if len(r.train) else 0.0)) / cfg.epochs)
    if cfg.max_time:
        spent.append(p.elapsed / cfg.max_time)
    return min(1.0, max(spent))


def _validate(r: _Run) -> float:
    """Validation loss; at most once per step (a second call at the same step returns the
    first result, so a plateau schedule never sees the same model twice)."""
    p = r.p
    if p.last_val_step == p.step:
        return p.last_val_loss
    with r.average.swapped() if r.average is not None else contextlib.nullcontext():
        nll, tokens = evaluate(r.model, r.val, r.device, r.d, r.policy)
        loss = nll / tokens
        improved = loss < p.best_val
        if improved:
            p.best_val = loss
            if r.d.main:
                checkpoint.save({**r.meta, "model": r.model.state_dict(), "step": p.step, "val_loss": loss},
                                r.ckpt_dir / "best.pt")
    r.lr_at.on_validation(loss)
    if r.average is not None and r.average.on_validation(loss, p.step):
        r.report.say(f"step {p.step}: validation stopped improving; averaging the weights from here (NT-ASGD)")
    p.last_val_step, p.last_val_loss, p.val_tokens = p.step, loss, tokens
    ppl = _ppl(nll, tokens)
    r.metrics.write({"step": p.step, "epoch": p.epoch, "split": "validation", "loss": loss, "ppl": ppl,
                     "tokens": tokens, "best": improved})
    r.report.say(f"step {p.step} | epoch {p.epoch} | validation perplexity {ppl:.2f} "
                 f"({r.cfg.mode} protocol, {tokens:,} tokens){' | best' if improved else ''}")
    return loss


def _save(r: _Run, kind: str) -> None:
    """Step checkpoint (for resume) of every rank's position, written by rank 0."""
    d, p = r.d, r.p
    p.elapsed = time.perf_counter() - r.clock0 if d.world == 1 else p.elapsed
    all_rng = d.all_gather(_rng_state())  # each rank's own streams (dropout differs per rank)
    carry = d.all_gather(None if r.carry is None else [s.cpu() for s in r.carry]) if r.train.carries_state else None
    data = r.train.state_dict(p.consumed)
    if getattr(r.train, "per_rank_state", False):
        data = d.all_gather(data)
    if not d.main:
        return
    state = {**r.meta, "model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(),
             "schedule": r.lr_at.state_dict(), "data": data,
             "progress": vars(p).copy(), "rng": all_rng, "kind": kind, "carry": carry, "world": d.world,
             "average": None if r.average is None else r.average.state_dict(),
             "tf_ratio": teacher_forcing_ratio(r.cfg.teacher_forcing, p.step)}
    checkpoint.save(state, checkpoint.step_path(r.ckpt_dir, p.step))
    checkpoint.prune(r.ckpt_dir, r.cfg.keep_checkpoints)


def _resume(r: _Run, owner: rundir.RunDir | None) -> Path | None:
    """Restore everything from a checkpoint (``train.resume``: ``auto``, a path, or null)."""
    spec, meta, d = r.cfg.resume, r.meta, r.d
    if spec is None:
        return None
    if spec == "auto":
        found = checkpoint.load_latest(r.ckpt_dir)
        if found is None:
            return None
        ckpt, path = found
    else:
        path = Path(spec).expanduser()
        ckpt = checkpoint.load(path)
    if ckpt.get("tokenizer") != meta["tokenizer"] or ckpt.get("vocab_size") != meta["vocab_size"]:
        raise UserError(f"{path} was trained with another tokenizer/vocabulary than the prepared data in "
                        f"{meta['recipe']['data']['output']}; resume with the same data, or start a new train.output_dir")
    if "optimizer" not in ckpt:
        raise UserError(f"{path} holds model weights only (best.pt); resume from a step-*.pt checkpoint")
    if owner is not None:
        owner.check_checkpoint(ckpt, path)
    changes = rundir.resume_changes(ckpt["recipe"], meta["recipe"])  # refuses what a resume cannot change
    saved_mode = ckpt["recipe"]["train"].get("mode", "sequence")
    if saved_mode != r.cfg.mode:
        raise UserError(f"{path} was trained in {saved_mode} mode; resume it with train.mode={saved_mode}")
    if r.train.carries_state and ckpt.get("world", 1) != d.world:
        raise UserError(f"{path} was written by {ckpt.get('world', 1)} process(es) in stream mode, whose carried "
                        f"states are per rank; resume it with the same number of processes (now {d.world})")
    try:
        r.model.load_state_dict(ckpt["model"])
        r.optimizer.load_state_dict(ckpt["optimizer"])
        data = ckpt["data"] if "data" in ckpt else ckpt["sampler"]
        if getattr(r.train, "per_rank_state", False):
            if len(data) != d.world:
                raise UserError(f"{path} was written by {len(data)} process(es) reading a streamed source, whose "
                                f"buffers are per rank; resume it with the same number of processes (now {d.world})")
            data = data[d.rank]
        r.train.load_state_dict(data)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this recipe's model/data: {checkpoint.mismatch(e)}") from None
    r.lr_at.load_state_dict(ckpt["schedule"])
    if "train.lr" in changes:  # the new base rate, keeping the plateau annealing applied so far
        r.lr_at.base *= meta["recipe"]["train"]["lr"] / ckpt["recipe"]["train"]["lr"]
    if r.average is not None and ckpt.get("average") is not None:
        r.average.load_state_dict(ckpt["average"])
    for k, v in ckpt["progress"].items():
        setattr(r.p, k, v)
    rng = ckpt["rng"]
    _set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    carry = (ckpt.get("carry") or [None])[d.rank] if r.train.carries_state else None
    r.carry = None if carry is None else tuple(s.to(r.device) for s in carry)
    return path


def _check_replicas(model: torch.nn.Module, d: Dist) -> None:
    """Check once, at the end of training, that DDP kept every rank's weights identical.

    Only rank 0 writes, so a rank that drifted (a decision taken on local data, a
    non-deterministic collective) would otherwise go unnoticed.

    Raises:
        RuntimeError: the ranks' weights differ (a bug, not a user error).
    """
    if d.world == 1:
        return
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    digests = d.all_gather(h.hexdigest())
    if len(set(digests)) > 1:
        raise RuntimeError(f"DDP replicas diverged: weight digests per rank differ ({', '.join(x[:12] for x in digests)})")


# --------------------------------------------------------------------------- what the user sees


class _Metrics:
    """``metrics.jsonl``: one JSON object per event, written by rank 0 only."""

    def __init__(self, path: Path, enabled: bool, append: bool) -> None:
        self.path, self.enabled = path, enabled
        if enabled and not append:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                # significant digits, not decimals: a 1e-7 warmup lr must not log as 0.0
                f.write(json.dumps({k: (float(f"{v:.10g}") if isinstance(v, float) else v) for k, v in record.items()}) + "\n")


class _Reporter:
    """Progress on rank 0: a tqdm bar in a terminal, plain lines in a log file.

    The bar's total follows the real budget: the steps of ``epochs`` / ``max_steps``,
    or, when ``max_time`` will run out first, the steps it is projected to allow.
    Without a terminal, a line per train log record (at least every
    ``train.progress_every`` seconds) carries the same figures.
    """

    def __init__(self, r: _Run) -> None:
        self.r = r
        cfg = r.cfg
        self.enabled = r.d.main
        self.tty = self.enabled and sys.stderr.isatty()
        limits = [n for n in (cfg.max_steps, cfg.epochs and cfg.epochs * len(r.train)) if n]
        self.bar = tqdm(total=min(limits) if limits else None, initial=r.p.step, desc="train", unit="step",
                        disable=not self.tty, dynamic_ncols=True)

    def step(self) -> None:
        if not self.tty:
            return
        fraction = _budget_fraction(self.r)
        if fraction > 0 and self.r.cfg.max_time:
            projected = max(self.r.p.step, round(self.r.p.step / fraction))
            if self.bar.total is None or projected < self.bar.total:
                self.bar.total = projected
        self.bar.update(1)

    def train_record(self, rec: dict) -> None:
        if self.tty:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", ppl=f"{rec['ppl']:.1f}", lr=f"{rec['lr']:.3g}",
                                 tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
        elif self.enabled:
            cfg = self.r.cfg
            budget = " | ".join(x for x in (cfg.max_steps and f"max_steps {cfg.max_steps}",
                                            cfg.epochs and f"epochs {cfg.epochs}",
                                            cfg.max_time and f"max_time {cfg.max_time:g}s") if x)
            print(f"step {rec['step']} | epoch {rec['epoch']} | loss {rec['loss']:.4f} | ppl {rec['ppl']:.2f} | "
                  f"lr {rec['lr']:.3g} | {rec['tokens_per_s']:,.0f} tok/s | {rec['elapsed_s']:.0f}s "
                  f"({100 * _budget_fraction(self.r):.0f}% of {budget})", file=sys.stderr, flush=True)

    def say(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stderr) if self.tty else print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _log_train(r: _Run) -> None:
    p, w = r.p, r.window
    nll, tokens = r.d.all_sum(float(w["nll"]), w["tokens"])
    now = time.perf_counter()
    loss = nll / max(tokens, 1)
    rate = (p.tokens - w["tok0"]) / max(now - w["t"], 1e-9)
    rec = {"step": p.step, "epoch": p.epoch, "split": "train", "loss": loss, "ppl": _ppl(nll, tokens),
           "lr": w["lr"], "tokens": p.tokens, "elapsed_s": now - r.clock0, "tokens_per_s": rate,
           "grad_norm": float(w["grad_norm"]), "teacher_forcing": w["tf"], "skipped_steps": p.skipped}
    r.metrics.write(rec)
    r.report.train_record(rec)
    w.update(nll=0.0, tokens=0, t=now, tok0=p.tokens, last_log=now)


def _samples(r: _Run) -> None:
    """A few greedy continuations of the recipe's prompts (rank 0)."""
    cfg = r.cfg
    if not r.d.main or not cfg.prompts:
        return
    from lm.generate import complete  # needs `tokenizers`

    try:
        texts = complete(r.model, r.meta["tokenizer"], r.meta["special_ids"], cfg.prompts,
                         max_new_tokens=cfg.sample_tokens, warn=r.p.epoch == 0)  # unknown prompt words: once
    except ImportError:
        return
    for prompt, text in zip(cfg.prompts, texts):
        r.metrics.write({"step": r.p.step, "epoch": r.p.epoch, "split": "sample", "prompt": prompt, "text": text})
        r.report.say(f"  [{prompt}] → {text}")


def _plot(out_dir: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no curves.png (pip install matplotlib)", file=sys.stderr)
        return
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("validation", "o-")):
        pts = [(r["step"], r["ppl"]) for r in recs if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts), style, label=split)
    ax.set(xlabel="step", ylabel="perplexity", yscale="log", title=out_dir.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "curves.png", dpi=100)
    plt.close(fig)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


@cli
def main(argv: list[str]) -> int:
    tune_allocator()  # before the first large allocation: no mmap/munmap churn per step
    from pipeline.confighelp import recipe_help

    ap = ArgumentParser(
        prog="python -m lm.train",
        description="Train a GRU/LSTM language model from a recipe: prepares the data (data: section) when it "
                    "is missing or stale, trains (model:, train:), and reports validation and test perplexity.",
        epilog="Recipe keys, their defaults and types (from lm/config.py and pipeline/config.py):\n\n"
               + recipe_help(Recipe),
    )
    ap.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE), help="recipe YAML (default: recipes/wikitext.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted overrides of recipe keys (listed below), e.g. train.max_steps=100 model.cell=gru")
    args = ap.parse_args(argv)
    if "=" in args.recipe:
        args.overrides.insert(0, args.recipe)
        args.recipe = str(DEFAULT_RECIPE)
    recipe = load(args.recipe, args.overrides)
    run(recipe, argv=[args.recipe, *args.overrides])
    return 0


if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A gloo worker thread may still be releasing the last collective's tensors (which takes
        # the GIL) when the interpreter finalizes; it then aborts the process (std::terminate,
        # exit -6) after a successful run. Everything is written and closed: skip finalization.
        try:
            code = main()
        except SystemExit as e:  # a signal stop: 128 + signum
            code = e.code if isinstance(e.code, int) else 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(main())
