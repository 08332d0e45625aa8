"""Train a GRU/LSTM language model: ``python -m lm.train RECIPE [key=value ...]``.

This file is the loop; it reads top to bottom in :func:`_train`::

    setup       recipe → processes → device → data → model, optimiser, schedules → resume
    loop        per step: _step (forward, backward, clip, update)
                          _after_step (log, validate, checkpoint, stop?)
                per epoch end: _end_of_epoch (validate, samples, next epoch)
    finish      final validation if stale → test perplexity of the best weights → result.json

What it calls lives in files named after their jobs: the processes (lm/distributed.py),
the batch sources of the two protocols (lm/batches.py), evaluation (lm/evaluate.py), the
counters and random streams (lm/progress.py), what a checkpoint holds and how a run
resumes (lm/resume.py), and what the user sees (lm/report.py).

Two protocols (``train.mode``), one model call and one loss:

* ``sequence``: every prepared row (a line, a document) is an independent sequence from
  a zero state, batched by length;
* ``stream``: each split is one continuous text cut into ``batch_size`` streams read in
  windows of ``bptt`` tokens, each window starting from the detached final state of the
  one before. This is the protocol published WikiText-2 / PTB perplexities use.

Perplexity is ``exp(total NLL / predicted tokens)``; on WikiText-2 the predicted tokens
are the words plus one ``<eos>`` per line in both protocols, the published counts.

Distributed: ``torchrun --nproc_per_node N -m lm.train RECIPE`` (gloo on CPU, NCCL on
CUDA). Each rank gets its own batches (or its own streams), gradients are averaged by
DDP, evaluation sums are reduced across ranks, and only rank 0 logs and writes.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from lm import precision, rundir
from lm import state as st
from lm.averaging import WeightAverage
from lm.batches import BatchSource, open_splits
from lm.checkpoint import Key
from lm.config import Recipe, TrainConfig, load
from lm.device import resolve_device
from lm.distributed import Dist, StopSignal, agreed, check_replicas, init_distributed, shutdown
from lm.evaluate import evaluate, perplexity
from lm.model import RNNLM, build_model
from lm.precision import Precision
from lm.progress import Progress, seed_everything
from lm.report import (Metrics, Reporter, TrainWindow, hardware, launch_command, plot, resume_command, samples,
                       yaml_text)
from lm.resume import load_best, restore, save_best, save_step
from lm.runtime import tune_allocator
from lm.schedule import LRSchedule, teacher_forcing_ratio
from pipeline.collate import PackedBatch
from pipeline.errors import ArgumentParser, UserError, cli
from pipeline.typed_yaml import to_dict

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "wikitext.yaml"
# Under DDP the ranks agree on stopping and on the clock every this many steps (one
# small all_reduce); in one process the check is every step and costs nothing.
_AGREE_EVERY = 10


@dataclass
class Run:
    """What setup builds; the loop below reads and advances it."""

    recipe: Recipe
    d: Dist
    device: torch.device
    model: RNNLM
    ddp: torch.nn.Module  # the model, wrapped in DistributedDataParallel under torchrun
    optimizer: torch.optim.Optimizer
    lr_at: LRSchedule
    train: BatchSource
    val: BatchSource
    test: BatchSource | None
    meta: dict  # what every checkpoint carries besides the weights (recipe, tokenizer, run id, ...)
    stop: StopSignal
    policy: Precision  # mixed precision (lm/precision.py)
    scaler: torch.amp.GradScaler  # fp16 only; a pass-through otherwise
    average: WeightAverage | None = None  # NT-ASGD's running mean of the weights
    p: Progress = field(default_factory=Progress)
    report: Reporter | None = None
    window: TrainWindow | None = None  # train loss since the last log line
    carry: tuple | None = None  # stream mode: the detached state carried into the next window
    clock0: float = 0.0  # perf_counter at the (re)start, minus the elapsed time restored

    @property
    def cfg(self) -> TrainConfig:
        return self.recipe.train

    @property
    def out_dir(self) -> Path:
        return self.cfg.output_dir

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def run(recipe: Recipe, *, argv: list[str] = ()) -> dict:
    """Train per the recipe; returns the final metrics (perplexities, steps, tokens).

    Raises:
        UserError: any problem with the recipe, data or checkpoint.
    """
    d = init_distributed(recipe.train.device)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        device = resolve_device(recipe.train.device, d.local_rank, world=d.world)
        try:
            policy = precision.for_device(recipe.train.amp, device)
        except ValueError as e:
            raise UserError(f"train.amp: {e}") from None
        # rank 0 owns the output folder for the whole run (lm/rundir.py); a refusal comes
        # before anything is written, and every rank stops with it
        owner = agreed(d, lambda: rundir.claim(recipe.train.output_dir, resume=recipe.train.resume,
                                               recipe=to_dict(recipe)) if d.main else None)
        with owner or contextlib.nullcontext():
            return _train(recipe, d, device, policy, argv, owner)
    finally:
        for s, h in handlers.items():  # StopSignal's handlers must not outlive the run (notebooks, tests)
            if h is not None:
                signal.signal(s, h)
        shutdown(d)


def _train(recipe: Recipe, d: Dist, device: torch.device, policy: Precision, argv: list[str],
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
        save_step(r, reason or "epoch")
    r.report.close()
    check_replicas(r.model, d)
    if reason == "signal":
        _exit_on_signal(r, argv)
    return _finish(r, reason, argv)


# --------------------------------------------------------------------------- setup


def _setup(recipe: Recipe, d: Dist, device: torch.device, policy: Precision, owner: rundir.RunDir | None) -> Run:
    cfg = recipe.train
    seed_everything(cfg.seed + d.rank)
    splits, data_meta = open_splits(recipe, d, pin=device.type == "cuda")

    model = build_model(recipe.model, data_meta[Key.VOCAB_SIZE]).to(device)
    policy.apply(model)  # the output layer in the policy's dtype, before DDP wraps it
    ddp = model
    if d.world > 1:
        # an adaptive softmax's tail cluster gets no gradient on a rank whose batch has no target in it
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=model.may_leave_parameters_unused)
    average = None
    if cfg.average != "off":
        average = WeightAverage(model, nonmono=cfg.nonmono if cfg.average == "nonmono" else None)
    meta = {Key.RECIPE: to_dict(recipe), **data_meta, **(owner.checkpoint_fields() if owner else {})}
    r = Run(recipe=recipe, d=d, device=device, model=model, ddp=ddp, optimizer=_optimizer(model, cfg),
            lr_at=LRSchedule(cfg), train=splits["train"], val=splits["validation"], test=splits.get("test"),
            meta=meta, stop=StopSignal(announce=d.main), policy=policy, scaler=policy.grad_scaler(), average=average)

    resumed = agreed(d, lambda: restore(r, owner))
    if owner is not None:
        owner.start()
    if average is not None and cfg.average == "always" and not resumed:
        average.start(0)
    if d.main:
        r.out_dir.mkdir(parents=True, exist_ok=True)
        (r.out_dir / "recipe.yaml").write_text(yaml_text(to_dict(recipe)))
        n = r.train.epoch_length
        per_epoch = (f"{n:,} {'windows' if cfg.mode == 'stream' else 'batches'}/epoch/rank" if n is not None
                     else "streamed source (epoch length unknown)")
        print(f"{model.num_parameters():,} parameters | {cfg.mode} mode | {per_epoch} | device {device}"
              f"{f' | world {d.world}' if d.world > 1 else ''}"
              f"{f' | resumed from {resumed} at step {r.p.step}' if resumed else ''}", file=sys.stderr)
        print(policy.description, file=sys.stderr)
    metrics = Metrics(r.out_dir / "metrics.jsonl", d.main, append=resumed is not None)
    r.report = Reporter(cfg, metrics, enabled=d.main, step=r.p.step, epoch_length=r.train.epoch_length,
                        budget_spent=lambda: _budget_spent(r))
    r.clock0 = time.perf_counter() - r.p.elapsed
    r.window = TrainWindow(r.p.tokens)
    r.model.train()
    return r


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on biases
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _already_done(r: Run) -> str | None:
    cfg, p = r.cfg, r.p
    if cfg.max_steps and p.step >= cfg.max_steps:
        return "max_steps"
    if cfg.epochs and p.epoch >= cfg.epochs:
        return "epochs"
    if cfg.max_time is not None and p.elapsed >= cfg.max_time:
        return "max_time"
    return None


# --------------------------------------------------------------------------- one step


def _step(r: Run, batch: PackedBatch, lr_scale: float) -> None:
    """One optimiser step on one batch (per rank). At most one host sync: the finiteness
    of the gradient norm, which every rank decides alike (the gradient is all-reduced)."""
    cfg, p, d = r.cfg, r.p, r.d
    batch = batch.to(r.device, non_blocking=True)
    tf = teacher_forcing_ratio(cfg.teacher_forcing, p.step)
    lr = r.lr_at(p.step, _budget_spent(r), p.epoch) * lr_scale
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
    r.window.add(out.nll_sum, batch.num_tokens, lr=lr, tf=tf, grad_norm=grad_norm)
    r.report.step(p.step)


def _after_step(r: Run) -> str | None:
    """Log, validate and checkpoint as due; the reason to stop, if any."""
    cfg, p, d = r.cfg, r.p, r.d
    now = time.perf_counter()
    log_due = now - r.window.last_log >= cfg.progress_every
    if d.world == 1 or p.step % _AGREE_EVERY == 0:
        # the ranks agree on the clock (it drives a time-budgeted schedule and max_time),
        # on a stop signal any of them got, and on a time-based log line
        signum, p.elapsed, log_due = d.all_max(r.stop.signum, now - r.clock0, float(log_due))
        r.stop.agree(int(signum))
    else:
        log_due = False
    if p.step % cfg.log_every == 0 or log_due:
        r.report.train(r.window.record(p, d, r.clock0))
    if cfg.eval_every and p.step % cfg.eval_every == 0 and not _validation_ahead(r):
        _validate(r)
    if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
        save_step(r, "periodic")
    if r.stop.signum:
        return "signal"
    if cfg.max_time is not None and p.elapsed >= cfg.max_time:
        return "max_time"
    if cfg.max_steps and p.step >= cfg.max_steps:
        return "max_steps"
    return None


def _validation_ahead(r: Run) -> bool:
    """Whether the end of the epoch or ``max_steps`` validates anyway within half of
    ``eval_every`` steps: a periodic validation a few steps before it would see almost the
    same model, and count twice for a plateau schedule and NT-ASGD."""
    cfg, p = r.cfg, r.p
    ahead = [n for n in (r.train.epoch_length and r.train.epoch_length - p.consumed,
                         cfg.max_steps and cfg.max_steps - p.step) if n]
    return any(0 < n < cfg.eval_every / 2 for n in ahead)


def _end_of_epoch(r: Run) -> str | None:
    p = r.p
    _validate(r)
    _samples(r)
    p.epoch += 1
    p.consumed = 0
    r.carry = None  # stream mode starts every epoch from a zero state, as pytorch/examples does
    if r.cfg.epochs and p.epoch >= r.cfg.epochs:
        return "epochs"
    return None


def _budget_spent(r: Run) -> float:
    """How much of the run's budget is spent, in [0, 1]: the first of epochs, max_steps and
    max_time to run out decides. A cosine schedule ends exactly at the stop this way."""
    cfg, p = r.cfg, r.p
    spent = [0.0]
    if cfg.max_steps:
        spent.append(p.step / cfg.max_steps)
    if cfg.epochs:  # a streamed source's epoch length is unknown: whole epochs only
        n = r.train.epoch_length
        spent.append((p.epoch + (p.consumed / n if n else 0.0)) / cfg.epochs)
    if cfg.max_time:
        spent.append(p.elapsed / cfg.max_time)
    return min(1.0, max(spent))


# --------------------------------------------------------------------------- validation and samples


def _validate(r: Run) -> float:
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
            save_best(r, loss)
    r.lr_at.on_validation(loss)
    if r.average is not None and r.average.on_validation(loss, p.step):
        r.report.say(f"step {p.step}: validation stopped improving; averaging the weights from here (NT-ASGD)")
    p.last_val_step, p.last_val_loss, p.val_tokens = p.step, loss, tokens
    ppl = perplexity(nll, tokens)
    r.report.record({"step": p.step, "epoch": p.epoch, "split": "validation", "loss": loss, "ppl": ppl,
                     "tokens": tokens, "best": improved},
                    f"step {p.step} | epoch {p.epoch} | validation perplexity {ppl:.2f} "
                    f"({r.cfg.mode} protocol, {tokens:,} tokens){' | best' if improved else ''}")
    return loss


def _samples(r: Run) -> None:
    """A few greedy continuations of the recipe's prompts (rank 0)."""
    if not r.d.main:
        return
    for prompt, text in samples(r.model, r.meta, r.cfg, warn=r.p.epoch == 0):  # unknown prompt words: once
        r.report.record({"step": r.p.step, "epoch": r.p.epoch, "split": "sample", "prompt": prompt, "text": text},
                        f"  [{prompt}] → {text}")


# --------------------------------------------------------------------------- finish


def _finish(r: Run, reason: str, argv: list[str]) -> dict:
    """Final validation if the last one is stale, test perplexity of the best weights."""
    p, d = r.p, r.d
    if reason in ("max_steps", "max_time") and p.consumed:
        _validate(r)
        _samples(r)  # a mid-epoch stop: the epoch's samples never came
    result = {"steps": p.step, "epochs": p.epoch, "tokens": p.tokens, "skipped_steps": p.skipped,
              "mode": r.cfg.mode, "best_val_ppl": math.exp(p.best_val) if p.best_val < math.inf else None,
              "val_tokens": r.val.num_tokens if r.val.num_tokens is not None else p.val_tokens,
              "train_seconds": round(p.elapsed, 1), "stopped_by": reason,
              "parameters": r.model.num_parameters(), "device": str(r.device), "world": d.world,
              "tokens_per_s": round(p.tokens / max(p.elapsed, 1e-9), 1), "command": launch_command(argv),
              "hardware": hardware(r.device), "torch": torch.__version__}
    # every rank takes the same decision (best_val is reduced identically on all ranks)
    if r.test is not None and p.best_val < math.inf:
        load_best(r)
        nll, tokens = evaluate(r.model, r.test, r.device, d, r.policy)
        result["test_ppl"] = perplexity(nll, tokens)
        result["test_tokens"] = tokens
        r.report.record({"step": p.step, "split": "test", "loss": nll / tokens, "ppl": result["test_ppl"],
                         "tokens": tokens},
                        f"test perplexity {result['test_ppl']:.2f} ({r.cfg.mode} protocol, {tokens:,} tokens)")
    if d.main:
        (r.out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if r.cfg.plot:
            plot(r.out_dir)
        print(json.dumps(result), file=sys.stderr)
    return result


def _exit_on_signal(r: Run, argv: list[str]) -> None:
    signum = r.stop.signum
    if r.d.main:
        print(f"{signal.Signals(signum).name}: saved a checkpoint at step {r.p.step} in {r.ckpt_dir}.\n"
              f"Resume with: {resume_command(argv)}", file=sys.stderr)
    raise SystemExit(128 + signum)


# --------------------------------------------------------------------------- command line


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
