"""Averaged weights for evaluation: NT-ASGD's Polyak average (Merity et al. 2017).

AWD-LSTM trains with SGD and, once validation stops improving (the non-monotone
trigger below), switches to ASGD, whose only effect with its settings (``t0=0,
lambd=0``) is to keep the running mean of the parameters after every step from the
switch on and to evaluate and save with that mean. :class:`WeightAverage` does the
same beside any optimiser: the trainer keeps stepping its own optimiser and calls
:meth:`WeightAverage.update` after each step.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn


def nonmono_triggered(history: Sequence[float], loss: float, nonmono: int) -> bool:
    """NT-ASGD's switch rule: ``loss`` is worse than the best validation loss from before
    the last ``nonmono`` evaluations (AWD-LSTM ``main.py``: ``len(h) > n and loss > min(h[:-n])``).

    Args:
        history: validation losses of the earlier evaluations, oldest first (not ``loss``).
        loss: this evaluation's validation loss.
        nonmono: how many recent evaluations may fail to improve before switching (AWD-LSTM: 5).

    Returns:
        Whether to start averaging now.
    """
    return len(history) > nonmono and loss > min(history[:-nonmono])


class WeightAverage:
    """Running mean of a model's parameters over the steps since :meth:`start`.

    Sums are kept in float64 and divided on use, so the average is the exact mean of the
    iterates (up to the final rounding) and a resumed run continues it bit for bit.

    Args:
        model: the module whose parameters are averaged (under DDP, the wrapped module);
            tied parameters are averaged once.
        nonmono: the trigger's window for :meth:`on_validation`; ``None`` never starts
            on its own (call :meth:`start`).
    """

    def __init__(self, model: nn.Module, nonmono: int | None = 5) -> None:
        if nonmono is not None and nonmono < 1:
            raise ValueError(f"nonmono must be >= 1 (or None), got {nonmono}")
        self.params = dict(model.named_parameters())
        self.nonmono = nonmono
        self.history: list[float] = []
        self.start_step: int | None = None
        self.count = 0
        self.sums: dict[str, Tensor] = {}

    @property
    def active(self) -> bool:
        """Whether averaging has started."""
        return self.start_step is not None

    def start(self, step: int) -> None:
        """Begin averaging: the next :meth:`update` is the first iterate in the mean."""
        if self.active:
            raise RuntimeError(f"averaging already started at step {self.start_step}")
        self.start_step, self.count = step, 0
        self.sums = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in self.params.items()}

    def on_validation(self, loss: float, step: int) -> bool:
        """Record a validation loss and start averaging if the non-monotone rule fires.

        Returns:
            ``True`` exactly once: at the evaluation that started averaging.
        """
        fire = not self.active and self.nonmono is not None and nonmono_triggered(self.history, loss, self.nonmono)
        self.history.append(loss)
        if fire:
            self.start(step)
        return fire

    @torch.no_grad()
    def update(self) -> None:
        """Add the current parameters to the mean (call after each optimiser step); a no-op
        before :meth:`start`."""
        if not self.active:
            return
        for n, p in self.params.items():
            self.sums[n].add_(p.detach())
        self.count += 1

    def averaged(self) -> dict[str, Tensor]:
        """The mean of the iterates so far, each in its parameter's dtype."""
        if not self.count:
            raise RuntimeError("no iterate averaged yet")
        return {n: (self.sums[n] / self.count).to(p.dtype) for n, p in self.params.items()}

    @contextmanager
    def swapped(self) -> Iterator[bool]:
        """Evaluate or save with the averaged weights; the trained ones come back on exit.

        Yields:
            Whether the weights were swapped (not before the first averaged step).
        """
        if not self.count:
            yield False
            return
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, a in self.averaged().items():
                self.params[n].copy_(a)
        try:
            yield True
        finally:
            with torch.no_grad():
                for n, b in backup.items():
                    self.params[n].copy_(b)

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: trigger history, start step, count, sums."""
        return {"history": list(self.history), "start_step": self.start_step, "count": self.count,
                "sums": {n: s.clone() for n, s in self.sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output (sums moved to the parameters' devices)."""
        if state["sums"] and set(state["sums"]) != set(self.params):
            raise ValueError(f"averaged parameters differ: {sorted(set(state['sums']) ^ set(self.params))}")
        self.history = list(state["history"])
        self.start_step, self.count = state["start_step"], state["count"]
        self.sums = {n: s.to(self.params[n].device, torch.float64) for n, s in state["sums"].items()}
