"""What the user sees of a training run: the progress bar or log lines, ``metrics.jsonl``,
sample continuations, ``curves.png``, and the commands and hardware a result names.

Only rank 0 reports; on the other ranks every method here is a no-op.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lm.checkpoint import Key
from lm.config import TrainConfig
from lm.distributed import Dist
from lm.evaluate import perplexity
from lm.progress import Progress


class Metrics:
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


class TrainWindow:
    """The training loss since the last log line, summed on the device: no host sync per step."""

    def __init__(self, tokens_so_far: int) -> None:
        now = time.perf_counter()
        self.nll: torch.Tensor | float = 0.0
        self.tokens = 0  # this rank's predicted tokens in the window
        self.t, self.last_log, self.tok0 = now, now, tokens_so_far
        self.lr, self.tf, self.grad_norm = 0.0, 1.0, torch.zeros(())

    def add(self, nll_sum: torch.Tensor, tokens: int, *, lr: float, tf: float, grad_norm: torch.Tensor) -> None:
        """One step's summed NLL (a non-finite step counts as 0: it was skipped) and figures."""
        self.nll = self.nll + torch.nan_to_num(nll_sum.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        self.tokens += tokens
        self.lr, self.tf, self.grad_norm = lr, tf, grad_norm

    def record(self, p: Progress, d: Dist, clock0: float) -> dict:
        """The train record of the window over all ranks; the window starts again."""
        nll, tokens = d.all_sum(float(self.nll), self.tokens)
        now = time.perf_counter()
        rec = {"step": p.step, "epoch": p.epoch, "split": "train", "loss": nll / max(tokens, 1),
               "ppl": perplexity(nll, tokens), "lr": self.lr, "tokens": p.tokens, "elapsed_s": now - clock0,
               "tokens_per_s": (p.tokens - self.tok0) / max(now - self.t, 1e-9),
               "grad_norm": float(self.grad_norm), "teacher_forcing": self.tf, "skipped_steps": p.skipped}
        self.nll, self.tokens, self.t, self.tok0, self.last_log = 0.0, 0, now, p.tokens, now
        return rec


class Reporter:
    """Progress on rank 0: a tqdm bar in a terminal, plain lines in a log file, and ``metrics.jsonl``.

    The bar's total follows the real budget: the steps of ``epochs`` / ``max_steps``,
    or, when ``max_time`` will run out first, the steps it is projected to allow.
    Without a terminal, a line per train log record (at least every
    ``train.progress_every`` seconds) carries the same figures.

    Args:
        cfg: the run's train config (budget keys).
        metrics: where records go.
        enabled: rank 0.
        step: the step the run starts at (0, or a resumed step).
        epoch_length: batches per epoch, if known.
        budget_spent: the fraction of the run's budget spent, in [0, 1].
    """

    def __init__(self, cfg: TrainConfig, metrics: Metrics, *, enabled: bool, step: int, epoch_length: int | None,
                 budget_spent: Callable[[], float]) -> None:
        self.cfg, self.metrics, self.enabled, self.budget_spent = cfg, metrics, enabled, budget_spent
        self.tty = enabled and sys.stderr.isatty()
        limits = [n for n in (cfg.max_steps, cfg.epochs and epoch_length and cfg.epochs * epoch_length) if n]
        self.bar = tqdm(total=min(limits) if limits else None, initial=step, desc="train", unit="step",
                        disable=not self.tty, dynamic_ncols=True)

    def step(self, step: int) -> None:
        """A step was taken (the bar moves; its total follows a time budget)."""
        if not self.tty:
            return
        fraction = self.budget_spent()
        if fraction > 0 and self.cfg.max_time:
            projected = max(step, round(step / fraction))
            if self.bar.total is None or projected < self.bar.total:
                self.bar.total = projected
        self.bar.update(1)

    def train(self, rec: dict) -> None:
        """A train record: to metrics.jsonl, and to the bar or a log line."""
        self.metrics.write(rec)
        if self.tty:
            self.bar.set_postfix(loss=f"{rec['loss']:.3f}", ppl=f"{rec['ppl']:.1f}", lr=f"{rec['lr']:.3g}",
                                 tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
        elif self.enabled:
            cfg = self.cfg
            budget = " | ".join(x for x in (cfg.max_steps and f"max_steps {cfg.max_steps}",
                                            cfg.epochs and f"epochs {cfg.epochs}",
                                            cfg.max_time and f"max_time {cfg.max_time:g}s") if x)
            print(f"step {rec['step']} | epoch {rec['epoch']} | loss {rec['loss']:.4f} | ppl {rec['ppl']:.2f} | "
                  f"lr {rec['lr']:.3g} | {rec['tokens_per_s']:,.0f} tok/s | {rec['elapsed_s']:.0f}s "
                  f"({100 * self.budget_spent():.0f}% of {budget})", file=sys.stderr, flush=True)

    def record(self, rec: dict, line: str | None = None) -> None:
        """Any other record (validation, test, sample), and the line that tells it, if any."""
        self.metrics.write(rec)
        if line is not None:
            self.say(line)

    def say(self, line: str) -> None:
        if self.enabled:
            tqdm.write(line, file=sys.stderr) if self.tty else print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def samples(model: torch.nn.Module, meta: dict, cfg: TrainConfig, *, warn: bool) -> list[tuple[str, str]]:
    """Greedy continuations of ``cfg.prompts`` as ``(prompt, text)``; none without ``tokenizers``."""
    if not cfg.prompts:
        return []
    try:
        from lm.generate import complete  # needs `tokenizers`
    except ImportError:
        return []
    texts = complete(model, meta[Key.TOKENIZER], meta[Key.SPECIAL_IDS], cfg.prompts,
                     max_new_tokens=cfg.sample_tokens, warn=warn)
    return list(zip(cfg.prompts, texts))


def plot(out_dir: Path) -> None:
    """``curves.png``: train and validation perplexity against steps (needs matplotlib)."""
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


def hardware(device: torch.device) -> str:
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


def resume_command(argv: list[str]) -> str:
    """The command that continues this run, as it was launched (torchrun included)."""
    return launch_command([*argv, "train.resume=auto"])


def launch_command(argv: list[str]) -> str:
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


def yaml_text(data: dict) -> str:
    """``data`` as YAML, keys in their order (the recipe.yaml a run writes)."""
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
