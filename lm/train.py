"""Train a GRU/LSTM language model: ``python -m lm.train RECIPE [key=value ...]``.

Reads top to bottom: setup (recipe, processes, device, data, model, optimiser,
resume) → train (teacher forcing or scheduled sampling, periodic validation and
checkpoints) → cleanup (test perplexity of the best checkpoint, plot).

Perplexity is ``exp(total NLL / predicted tokens)``; on WikiText-2 the predicted tokens
are the words plus one ``<eos>`` per line, so the numbers compare with published ones.

Distributed: ``torchrun --nproc_per_node N -m lm.train RECIPE`` (gloo on CPU, NCCL on
CUDA). Each rank gets its own batches from the bucket sampler, gradients are averaged by
DDP, evaluation sums are reduced across ranks, and only rank 0 logs and writes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lm import checkpoint
from lm.config import ModelConfig, Recipe, load
from lm.model import RNNLM
from lm.schedule import LRSchedule, teacher_forcing_ratio
from pipeline.config import to_dict
from pipeline.data import TokenDataset, make_loader, read_manifest
from pipeline.errors import UserError, cli
from pipeline.sampling import BucketBatchSampler

DEFAULT_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "wikitext.yaml"


# --------------------------------------------------------------------------- setup helpers


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


def _device(name: str, d: Dist) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", d.local_rank)
        if torch.backends.mps.is_available() and d.world == 1:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"train.device={name}: not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA GPU is available (use train.device=auto or cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available (use train.device=auto or cpu)")
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
    return device


def _prepare_data(recipe: Recipe, d: Dist) -> dict:
    """Run ``pipeline.prepare`` when the prepared data is missing or stale (rank 0 only)."""
    if d.main:
        from pipeline.prepare import prepare  # datasets/tokenizers are imported only if it must build

        prepare(recipe.data)
    if d.world > 1:
        dist.barrier()
    return read_manifest(recipe.data.output)


def _loader(ds: TokenDataset, recipe: Recipe, d: Dist, *, train: bool, pin: bool) -> DataLoader:
    cfg = recipe.train
    longest = int(ds.lengths.max())
    if cfg.max_tokens is not None and cfg.max_tokens < longest:
        raise UserError(
            f"train.max_tokens={cfg.max_tokens} is smaller than the longest {ds.split} sequence ({longest} ids); "
            f"raise it, or cap sequences with data.max_len"
        )
    try:
        return make_loader(ds, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size, shuffle=train, seed=cfg.seed,
                           num_workers=cfg.num_workers, pin_memory=pin, num_replicas=d.world, rank=d.rank)
    except ValueError as e:
        raise UserError(f"{ds.split} split: {e}") from None


def build_model(m: ModelConfig, vocab_size: int) -> RNNLM:
    """The model a recipe's ``model:`` section describes."""
    try:
        return RNNLM(
            vocab_size, cell=m.cell, embed_dim=m.embed_dim, hidden_size=m.hidden_size, num_layers=m.num_layers,
            dropout_emb=m.dropout_emb, dropout_rnn=m.dropout_rnn if m.num_layers > 1 else 0.0,
            dropout_out=m.dropout_out, locked_dropout=m.locked_dropout, tie_weights=m.tie_weights,
            adaptive_cutoffs=m.adaptive_cutoffs, pad_id=0,
        )
    except ValueError as e:
        raise UserError(f"model: {e}") from None


def _optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
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


@torch.no_grad()
def evaluate(model: RNNLM, loader: DataLoader, device: torch.device, d: Dist, amp: bool) -> tuple[float, int]:
    """Summed NLL and predicted tokens over a whole split, across all ranks.

    Returns:
        ``(nll_sum, tokens)``; perplexity is ``exp(nll_sum / tokens)``.
    """
    was = model.training
    model.eval()
    nll, tokens = 0.0, 0
    for batch in loader:
        batch = batch.to(device, non_blocking=True)
        with _autocast(device, amp):
            out = model(batch, need_state=False, need_logits=False)
        nll += out.nll_sum.item()
        tokens += out.num_tokens
    model.train(was)
    nll, tokens = d.all_sum(nll, tokens)
    return nll, int(tokens)


def _autocast(device: torch.device, amp: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _ppl(nll: float, tokens: int) -> float:
    return math.exp(min(nll / max(tokens, 1), 700.0))


# --------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Everything that moves during training and must survive a restart."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0  # batches of this epoch trained on
    tokens: int = 0  # cumulative predicted tokens trained on (all ranks)
    best_val: float = math.inf
    nonfinite: int = 0  # non-finite steps in a row
    skipped: int = 0  # non-finite steps in total
    elapsed: float = 0.0  # training seconds before this process started


class _Stop:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step and exits."""

    def __init__(self) -> None:
        self.signum = 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum


def run(recipe: Recipe, *, argv: list[str] = ()) -> dict:
    """Train per the recipe; returns the final metrics (perplexities, steps, tokens).

    Raises:
        UserError: any problem with the recipe, data or checkpoint.
    """
    cfg = recipe.train
    d = _init_distributed(cfg.device)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(recipe, d, argv)
    finally:
        for s, h in handlers.items():  # _Stop's handlers must not outlive the run (notebooks, tests)
            if h is not None:
                signal.signal(s, h)
        if d.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(recipe: Recipe, d: Dist, argv) -> dict:
    cfg = recipe.train
    device = _device(cfg.device, d)
    out_dir, ckpt_dir = cfg.output_dir, cfg.output_dir / "checkpoints"
    torch.manual_seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)

    # ---- data
    manifest = _prepare_data(recipe, d)
    folder = recipe.data.output
    tokenizer_json = (folder / "tokenizer.json").read_text(encoding="utf-8")
    ids = manifest["special_ids"]
    pin = device.type == "cuda"
    train_ds = TokenDataset(folder, "train")
    train_loader = _loader(train_ds, recipe, d, train=True, pin=pin)
    val_loader = _loader(TokenDataset(folder, "validation"), recipe, d, train=False, pin=pin)
    test_loader = _loader(TokenDataset(folder, "test"), recipe, d, train=False, pin=pin) if "test" in manifest["splits"] else None
    sampler: BucketBatchSampler = train_loader.batch_sampler

    # ---- model, optimiser, schedules
    model = build_model(recipe.model, manifest["vocab_size"]).to(device)
    optimizer = _optimizer(model, cfg)
    limits = [n for n in (cfg.max_steps, cfg.epochs and cfg.epochs * len(sampler)) if n]
    total_steps = min(limits) if limits else None  # unknown with max_time alone
    if cfg.schedule == "cosine" and not total_steps:
        raise UserError("train.schedule=cosine needs train.epochs or train.max_steps to know the run's length")
    lr_at = LRSchedule(cfg, total_steps)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) if d.world > 1 else model
    p = Progress()

    # ---- resume
    meta = {"recipe": to_dict(recipe), "tokenizer": tokenizer_json, "special_ids": ids,
            "vocab_size": manifest["vocab_size"], "data_fingerprint": manifest["fingerprint"]}
    resumed = _resume(cfg.resume, ckpt_dir, meta, model, optimizer, lr_at, sampler, p, d)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "recipe.yaml").write_text(_yaml(to_dict(recipe)))
        print(f"{model.num_parameters():,} parameters | {len(sampler):,} batches/epoch/rank | device {device}"
              f"{f' | world {d.world}' if d.world > 1 else ''}{f' | resumed from {resumed} at step {p.step}' if resumed else ''}",
              file=sys.stderr)
    metrics = _Metrics(out_dir / "metrics.jsonl", d.main, append=resumed is not None)

    def save(kind: str) -> None:
        """Step checkpoint (for resume) on every rank's data, written by rank 0."""
        all_rng = d.all_gather(_rng_state())  # each rank's own streams (dropout differs per rank)
        if not d.main:
            return
        state = {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": lr_at.state_dict(), "sampler": sampler.state_dict(batches_consumed=p.consumed),
                 "progress": vars(p).copy(), "rng": all_rng, "kind": kind,
                 "tf_ratio": teacher_forcing_ratio(cfg.teacher_forcing, p.step)}
        checkpoint.save(state, checkpoint.step_path(ckpt_dir, p.step))
        checkpoint.prune(ckpt_dir, cfg.keep_checkpoints)

    def validate() -> float:
        nll, tokens = evaluate(model, val_loader, device, d, cfg.amp)
        loss = nll / tokens
        improved = loss < p.best_val
        lr_at.on_validation(loss)
        if improved:
            p.best_val = loss
            if d.main:
                checkpoint.save({**meta, "model": model.state_dict(), "step": p.step, "val_loss": loss},
                                ckpt_dir / "best.pt")
        metrics.write({"step": p.step, "epoch": p.epoch, "split": "validation", "loss": loss,
                       "ppl": _ppl(nll, tokens), "tokens": tokens, "best": improved})
        return loss

    # ---- train
    stop = _Stop()
    start = time.perf_counter() - p.elapsed
    window = {"nll": 0.0, "tokens": 0, "t": time.perf_counter(), "tok0": p.tokens}
    bar = tqdm(total=total_steps, initial=p.step, desc="train", unit="step", disable=not d.main or None, dynamic_ncols=True)
    # a run resumed after it had finished (the same command again, a requeued job) must not train past its end
    reason = "max_steps" if cfg.max_steps and p.step >= cfg.max_steps else "epochs" if cfg.epochs and p.epoch >= cfg.epochs else None
    done = reason is not None
    model.train()
    while not done:
        sampler.set_epoch(p.epoch)  # keeps a restored mid-epoch position
        p.consumed = sampler.position  # 0, or where a resumed epoch stopped
        for batch in train_loader:
            batch = batch.to(device, non_blocking=True)
            tf = teacher_forcing_ratio(cfg.teacher_forcing, p.step)
            lr = lr_at(p.step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # loss per real target token of the whole global batch: rank sums / global count,
            # times world because DDP averages gradients over ranks
            global_tokens, halt = d.all_sum(batch.num_tokens, float(stop.signum != 0 or _out_of_time(cfg, start)))
            with _autocast(device, cfg.amp):
                out = ddp(batch, teacher_forcing=tf, sample=cfg.teacher_forcing.sample, need_state=False, need_logits=False)
            loss = out.nll_sum * (d.world / global_tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
            # the gradient is all-reduced, so every rank takes the same decision here
            if torch.isfinite(grad_norm):
                optimizer.step()
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
            # kept on the device until the next log line: no host sync per step
            window["nll"] = window["nll"] + torch.nan_to_num(out.nll_sum.detach(), nan=0.0, posinf=0.0, neginf=0.0)
            window["tokens"] += batch.num_tokens
            bar.update(1)

            if p.step % cfg.log_every == 0:
                _log_train(metrics, bar, window, p, lr, tf, grad_norm, start, d)
            if cfg.eval_every and p.step % cfg.eval_every == 0:
                validate()
            if cfg.checkpoint_every and p.step % cfg.checkpoint_every == 0:
                save("periodic")
            if halt:
                reason = "signal" if stop.signum else "max_time"
            elif cfg.max_steps and p.step >= cfg.max_steps:
                reason = "max_steps"
            if reason:
                break
        else:  # the epoch is complete
            validate()
            _samples(model, recipe, tokenizer_json, ids, metrics, p, d)
            p.epoch += 1
            p.consumed = 0
            if cfg.epochs and p.epoch >= cfg.epochs:
                reason = "epochs"
        p.elapsed = time.perf_counter() - start
        done = reason is not None
        save(reason or "epoch")
    bar.close()
    _check_replicas(model, d)

    if reason == "signal":
        name = signal.Signals(stop.signum).name
        if d.main:
            print(f"{name}: saved a checkpoint at step {p.step} in {ckpt_dir}.\nResume with: "
                  f"python -m lm.train {' '.join(argv)} train.resume=auto", file=sys.stderr)
        raise SystemExit(128 + stop.signum)

    # ---- cleanup: final validation if the last one is stale, test perplexity of the best model
    if reason in ("max_steps", "max_time") and p.consumed:
        validate()
        _samples(model, recipe, tokenizer_json, ids, metrics, p, d)  # a mid-epoch stop: the epoch's samples never came
    result = {"steps": p.step, "epochs": p.epoch, "tokens": p.tokens, "skipped_steps": p.skipped,
              "best_val_ppl": math.exp(p.best_val) if p.best_val < math.inf else None,
              "train_seconds": round(p.elapsed, 1), "stopped_by": reason}
    best = ckpt_dir / "best.pt"
    if test_loader is not None and (best.is_file() or not d.main):
        if d.world > 1:
            dist.barrier()
        model.load_state_dict(checkpoint.load(best, map_location=device)["model"])
        nll, tokens = evaluate(model, test_loader, device, d, cfg.amp)
        result["test_ppl"] = _ppl(nll, tokens)
        metrics.write({"step": p.step, "split": "test", "loss": nll / tokens, "ppl": result["test_ppl"], "tokens": tokens})
    if d.main:
        (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
        if cfg.plot:
            _plot(out_dir)
        print(json.dumps(result), file=sys.stderr)
    return result


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


def _out_of_time(cfg, start: float) -> bool:
    return cfg.max_time is not None and time.perf_counter() - start >= cfg.max_time


def _resume(spec, ckpt_dir: Path, meta: dict, model, optimizer, lr_at, sampler, p: Progress, d: Dist) -> Path | None:
    """Restore everything from a checkpoint (``spec``: ``auto``, a path, or ``None``)."""
    if spec is None:
        return None
    if spec == "auto":
        found = checkpoint.load_latest(ckpt_dir)
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
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this recipe's model/data: {checkpoint.mismatch(e)}") from None
    lr_at.load_state_dict(ckpt["schedule"])
    for k, v in ckpt["progress"].items():
        setattr(p, k, v)
    rng = ckpt["rng"]
    _set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    return path


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


def _log_train(metrics, bar, window, p: Progress, lr, tf, grad_norm, start, d: Dist) -> None:
    nll, tokens = d.all_sum(float(window["nll"]), window["tokens"])
    now = time.perf_counter()
    loss = nll / max(tokens, 1)
    rate = (p.tokens - window["tok0"]) / max(now - window["t"], 1e-9)
    rec = {"step": p.step, "epoch": p.epoch, "split": "train", "loss": loss, "ppl": _ppl(nll, tokens), "lr": lr,
           "tokens": p.tokens, "elapsed_s": now - start, "tokens_per_s": rate, "grad_norm": float(grad_norm),
           "teacher_forcing": tf, "skipped_steps": p.skipped}
    metrics.write(rec)
    bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{rec['ppl']:.1f}", lr=f"{lr:.3g}", tok_s=f"{rate:,.0f}", refresh=False)
    window.update(nll=0.0, tokens=0, t=now, tok0=p.tokens)


def _samples(model: RNNLM, recipe: Recipe, tokenizer_json: str, ids: dict, metrics, p: Progress, d: Dist) -> None:
    """A few greedy continuations of the recipe's prompts (rank 0)."""
    if not d.main or not recipe.train.prompts:
        return
    from lm.generate import complete  # needs `tokenizers`

    try:
        texts = complete(model, tokenizer_json, ids, recipe.train.prompts, max_new_tokens=recipe.train.sample_tokens)
    except ImportError:
        return
    for prompt, text in zip(recipe.train.prompts, texts):
        metrics.write({"step": p.step, "epoch": p.epoch, "split": "sample", "prompt": prompt, "text": text})
        tqdm.write(f"  [{prompt}] → {text}", file=sys.stderr)


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
    from lm.runtime import tune_allocator

    tune_allocator()  # before the first large allocation: no mmap/munmap churn per step (issue 13)
    ap = argparse.ArgumentParser(prog="python -m lm.train", description="Train a GRU/LSTM language model from a recipe.")
    ap.add_argument("recipe", nargs="?", default=str(DEFAULT_RECIPE), help="recipe YAML (default: recipes/wikitext.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100 model.cell=gru")
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
