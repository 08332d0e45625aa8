"""Schedules as pure functions of the step: learning rate and teacher-forcing ratio.

Being functions of the step (plus the plateau state, saved in checkpoints), both are
restored exactly on resume.
"""
from __future__ import annotations

import math

from lm.config import TeacherForcingConfig, TrainConfig


def teacher_forcing_ratio(cfg: TeacherForcingConfig, step: int) -> float:
    """Probability of feeding the ground-truth token at training step ``step`` (0-based)."""
    if cfg.schedule == "constant":
        return cfg.start
    if cfg.schedule == "linear":
        p = cfg.start - (cfg.start - cfg.end) * min(step / cfg.decay_steps, 1.0)
    elif cfg.schedule == "exponential":
        p = cfg.start * cfg.k**step
    else:  # inverse sigmoid, Bengio et al. 2015: k / (k + exp(i / k))
        p = cfg.k / (cfg.k + math.exp(min(step / cfg.k, 700.0)))
    return max(cfg.end, p)


class LRSchedule:
    """Learning rate per step: linear warmup, then cosine / plateau / constant.

    ``plateau``: the base rate is multiplied by ``plateau_factor`` after each validation
    that does not improve on the best so far (pytorch/examples anneals SGD this way).
    ``cosine``: from the base rate down to ``min_lr`` at the end of the run's budget.
    ``epoch_decay``: the base rate for ``decay_start`` epochs, then times ``decay_factor``
    per epoch (Zaremba et al. 2014: 4 epochs at lr, then halved every epoch).
    The trainer passes the fraction of the budget spent — the first of ``epochs``,
    ``max_steps`` and ``max_time`` to run out decides — so a time-budgeted run ends its
    decay exactly at the stop. The fraction at which warmup ended is remembered (and
    checkpointed): the cosine spans the rest.

    Args:
        cfg: the ``train:`` section.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.base = cfg.lr
        self.best = math.inf
        self.warm_end: float | None = None  # budget fraction when warmup ended

    def __call__(self, step: int, fraction: float, epoch: int = 0) -> float:
        """The rate for step ``step`` (0-based) with ``fraction`` of the budget spent, in
        epoch ``epoch`` (0-based)."""
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return self.base * (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            if self.warm_end is None:
                self.warm_end = min(fraction, 1.0 - 1e-9)
            progress = min(1.0, max(0.0, (fraction - self.warm_end) / (1.0 - self.warm_end)))
            return cfg.min_lr + (self.base - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.schedule == "epoch_decay":
            return self.base * cfg.decay_factor ** max(0, epoch + 1 - cfg.decay_start)
        return self.base

    def on_validation(self, loss: float) -> None:
        """Anneal on a plateau (no-op for the other schedules; the best is tracked anyway)."""
        if loss < self.best:
            self.best = loss
        elif self.cfg.schedule == "plateau":
            self.base = max(self.cfg.min_lr, self.base * self.cfg.plateau_factor)

    def state_dict(self) -> dict:
        return {"base": self.base, "best": self.best, "warm_end": self.warm_end}

    def load_state_dict(self, state: dict) -> None:
        self.base, self.best = float(state["base"]), float(state["best"])
        self.warm_end = state.get("warm_end")
