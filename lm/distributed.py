"""The processes of a run: this rank's place, the collectives the trainer uses, stop signals.

``torchrun --nproc_per_node N -m lm.train RECIPE`` starts N processes (gloo on CPU, NCCL
on CUDA). Each rank reads its own batches, DDP averages the gradients, and every decision
that steers the loop (stop, clock, evaluation sums) is reduced so that all ranks take it
alike; only rank 0 writes. Without torchrun, :class:`Dist` is world 1 and every collective
returns its input.
"""
from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import UserError

T = TypeVar("T")


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

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.world > 1:
            dist.barrier()


def init_distributed(device_name: str) -> Dist:
    """Join the process group torchrun set up (``WORLD_SIZE`` > 1), else world 1."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(d.local_rank)
    # all_sum reduces CPU tensors, which NCCL alone cannot: gloo takes those, NCCL the CUDA ones
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return d


def shutdown(d: Dist) -> None:
    """Leave the process group, if this run joined one."""
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def agreed(d: Dist, fn: Callable[[], T]) -> T | None:
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


def check_replicas(model: torch.nn.Module, d: Dist) -> None:
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


class StopSignal:
    """SIGINT / SIGTERM: acknowledged at once, then a checkpoint after the current step.

    A second signal stops now (``KeyboardInterrupt``); checkpoints are written
    atomically, so the last good one stays intact. :func:`lm.train.run` puts the previous
    handlers back when the run ends.
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
