"""What moves during training and must survive a restart: the counters and the random streams."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Progress:
    """The run's counters; a step checkpoint stores them as a dict (``vars(progress)``)."""

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


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (dropout, sampling)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> dict:
    """This process's random streams, as plain data (``torch.load(weights_only=True)`` reads it)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in s["python"]))
    kind, keys, *rest = s["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
