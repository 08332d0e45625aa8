"""What a run's checkpoints hold, and how a run continues from one.

A step checkpoint (``checkpoints/step-*.pt``, written by rank 0 at periodic steps, epoch
ends and stops) holds everything a restart needs to continue bit-identically: the
weights, the optimiser, the schedule, every rank's data position and random streams,
the carried stream state, NT-ASGD's average and the counters (:class:`lm.progress.Progress`).
``best.pt`` holds the best validation weights only. The keys are :class:`lm.checkpoint.Key`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from lm import checkpoint, rundir
from lm.checkpoint import Key
from lm.progress import rng_state, set_rng_state
from lm.schedule import teacher_forcing_ratio
from pipeline.errors import UserError

if TYPE_CHECKING:
    from lm.train import Run


def save_step(r: Run, kind: str) -> None:
    """A step checkpoint (for resume) of every rank's position, written by rank 0.

    Every rank must call it: the ranks' random streams, carried states and (streamed
    source) buffers are gathered here.
    """
    d, p = r.d, r.p
    p.elapsed = time.perf_counter() - r.clock0 if d.world == 1 else p.elapsed
    all_rng = d.all_gather(rng_state())  # each rank's own streams (dropout differs per rank)
    carry = d.all_gather(None if r.carry is None else [s.cpu() for s in r.carry]) if r.train.carries_state else None
    data = r.train.state_dict(p.consumed)
    if r.train.per_rank_state:
        data = d.all_gather(data)
    if not d.main:
        return
    state = {**r.meta, Key.MODEL: r.model.state_dict(), Key.OPTIMIZER: r.optimizer.state_dict(),
             Key.SCHEDULE: r.lr_at.state_dict(), Key.DATA: data, Key.PROGRESS: vars(p).copy(), Key.RNG: all_rng,
             Key.KIND: kind, Key.CARRY: carry, Key.WORLD: d.world,
             Key.AVERAGE: None if r.average is None else r.average.state_dict(),
             Key.TF_RATIO: teacher_forcing_ratio(r.cfg.teacher_forcing, p.step)}
    checkpoint.save(state, checkpoint.step_path(r.ckpt_dir, p.step))
    checkpoint.prune(r.ckpt_dir, r.cfg.keep_checkpoints)


def save_best(r: Run, loss: float) -> None:
    """``best.pt``: the current weights and the validation loss they reached (rank 0)."""
    if r.d.main:
        checkpoint.save({**r.meta, Key.MODEL: r.model.state_dict(), Key.STEP: r.p.step, Key.VAL_LOSS: loss},
                        r.ckpt_dir / "best.pt")


def load_best(r: Run) -> None:
    """Load ``best.pt``'s weights into the model, on every rank (after rank 0 wrote it)."""
    r.d.barrier()
    r.model.load_state_dict(checkpoint.load(r.ckpt_dir / "best.pt", map_location=r.device)[Key.MODEL])


def restore(r: Run, owner: rundir.RunDir | None) -> Path | None:
    """Restore everything from a checkpoint (``train.resume``: ``auto``, a path, or null).

    Returns:
        the checkpoint's path, or ``None`` when the run starts fresh.

    Raises:
        UserError: the checkpoint belongs to another run or data, or does not fit the recipe.
    """
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
    if ckpt.get(Key.TOKENIZER) != meta[Key.TOKENIZER] or ckpt.get(Key.VOCAB_SIZE) != meta[Key.VOCAB_SIZE]:
        raise UserError(f"{path} was trained with another tokenizer/vocabulary than the prepared data in "
                        f"{meta[Key.RECIPE]['data']['output']}; resume with the same data, or start a new train.output_dir")
    if Key.OPTIMIZER not in ckpt:
        raise UserError(f"{path} holds model weights only (best.pt); resume from a step-*.pt checkpoint")
    if owner is not None:
        owner.check_checkpoint(ckpt, path)
    changes = rundir.resume_changes(ckpt[Key.RECIPE], meta[Key.RECIPE])  # refuses what a resume cannot change
    saved_mode = ckpt[Key.RECIPE]["train"].get("mode", "sequence")
    if saved_mode != r.cfg.mode:
        raise UserError(f"{path} was trained in {saved_mode} mode; resume it with train.mode={saved_mode}")
    if r.train.carries_state and ckpt.get(Key.WORLD, 1) != d.world:
        raise UserError(f"{path} was written by {ckpt.get(Key.WORLD, 1)} process(es) in stream mode, whose carried "
                        f"states are per rank; resume it with the same number of processes (now {d.world})")
    try:
        r.model.load_state_dict(ckpt[Key.MODEL])
        r.optimizer.load_state_dict(ckpt[Key.OPTIMIZER])
        data = ckpt[Key.DATA] if Key.DATA in ckpt else ckpt[Key.OLD_DATA]
        if r.train.per_rank_state:
            if len(data) != d.world:
                raise UserError(f"{path} was written by {len(data)} process(es) reading a streamed source, whose "
                                f"buffers are per rank; resume it with the same number of processes (now {d.world})")
            data = data[d.rank]
        r.train.load_state_dict(data)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"{path} does not fit this recipe's model/data: {checkpoint.mismatch(e)}") from None
    r.lr_at.load_state_dict(ckpt[Key.SCHEDULE])
    if "train.lr" in changes:  # the new base rate, keeping the plateau annealing applied so far
        r.lr_at.base *= meta[Key.RECIPE]["train"]["lr"] / ckpt[Key.RECIPE]["train"]["lr"]
    if r.average is not None and ckpt.get(Key.AVERAGE) is not None:
        r.average.load_state_dict(ckpt[Key.AVERAGE])
    for k, v in ckpt[Key.PROGRESS].items():
        setattr(r.p, k, v)
    rng = ckpt[Key.RNG]
    set_rng_state(rng[d.rank] if d.rank < len(rng) else rng[0])
    carry = (ckpt.get(Key.CARRY) or [None])[d.rank] if r.train.carries_state else None
    r.carry = None if carry is None else tuple(s.to(r.device) for s in carry)
    return path
