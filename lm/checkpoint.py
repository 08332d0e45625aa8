"""Checkpoints: atomic writes, checksums, safe loading.

A checkpoint is a ``torch.save`` file of plain data — tensors, numbers, strings, lists,
dicts — so it loads with ``torch.load(weights_only=True)`` and cannot run code. The
recipe is stored as a dict and the tokenizer as its JSON text, never pickled objects.

Writes go to a temporary file that is fsync'ed and renamed, so a kill at any moment
leaves either the old file or the new one. A ``.sha256`` file beside each checkpoint
lets a truncated or corrupted file be told apart from a good one; it is updated so that
the pair verifies at every moment of a save (see :func:`save`).
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from pipeline.errors import UserError

_STEP = re.compile(r"^step-(\d+)\.pt$")


class Key:
    """The keys of a checkpoint dict, one name per thing stored.

    Every checkpoint (``best.pt`` and ``step-*.pt``) holds what rebuilds and describes the
    model: ``RECIPE``, ``MODEL``, ``TOKENIZER``, ``SPECIAL_IDS``, ``VOCAB_SIZE``,
    ``DATA_FINGERPRINT`` and the owning run's ``RUN_ID`` (lm/rundir.py). ``best.pt`` adds
    the ``STEP`` and ``VAL_LOSS`` it was chosen at; a step checkpoint adds what resumes the
    run (lm/resume.py): the rest.
    """

    RECIPE = "recipe"  # the run's recipe, a plain dict
    MODEL = "model"  # the model's state_dict
    TOKENIZER = "tokenizer"  # the tokenizer's JSON text
    SPECIAL_IDS = "special_ids"  # {"pad": 0, "bos": ..., "eos": ..., "unk": ...}
    VOCAB_SIZE = "vocab_size"
    DATA_FINGERPRINT = "data_fingerprint"  # the prepared data's (or the streamed source's) fingerprint
    RUN_ID = "run_id"
    STEP = "step"  # best.pt: the step its weights are from
    VAL_LOSS = "val_loss"  # best.pt: their validation loss (NLL per predicted token)
    OPTIMIZER = "optimizer"
    SCHEDULE = "schedule"  # the learning-rate schedule's state
    DATA = "data"  # the batch source's position (a list, one per rank, for a streamed source)
    OLD_DATA = "sampler"  # DATA's name in checkpoints written before it covered stream windows
    PROGRESS = "progress"  # lm.progress.Progress as a dict
    RNG = "rng"  # every rank's random-number streams
    KIND = "kind"  # why it was written: "periodic", "epoch", "signal", "max_steps", ...
    CARRY = "carry"  # stream mode: every rank's carried recurrent state
    WORLD = "world"  # processes that wrote it
    AVERAGE = "average"  # NT-ASGD's running average of the weights
    TF_RATIO = "tf_ratio"  # the teacher-forcing ratio at this step (for the reader)


def save(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` with its checksum, atomically as the loader sees it.

    The order makes every moment of the sequence leave a pair :func:`load` accepts:

    1. the new file is written to ``.NAME.tmp-PID`` and fsync'ed;
    2. the ``.sha256`` sidecar is replaced by one listing the new digest *and* the current
       file's, so the old file still verifies;
    3. the temporary file is renamed over ``path`` (now the new file verifies);
    4. the sidecar is replaced by one listing only the new digest.

    Temporary files that killed processes left in the folder are removed first.

    Raises:
        UserError: the file cannot be written (disk full: "no space left"; read-only,
            permissions); the temporary files are removed and earlier checkpoints are intact.
    """
    sidecar = path.with_name(path.name + ".sha256")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        current = []
        if path.is_file():  # the file on disk now: its sidecar's one digest, else hashed (a pair left mid-save)
            listed = _digests(sidecar)
            current = listed if len(listed) == 1 else [_sha256(path)]
        _write_atomic(sidecar, "".join(f"{d}\n" for d in [digest, *current]))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        _write_atomic(sidecar, digest + "\n")
    except (OSError, RuntimeError) as e:
        for t in (tmp, sidecar.with_name(f".{sidecar.name}.tmp-{os.getpid()}")):
            try:
                t.unlink(missing_ok=True)
            except OSError:
                pass
        err = e if isinstance(e, OSError) else e.__context__ if isinstance(e.__context__, OSError) else None
        if err is None:  # a RuntimeError that is not about the disk: a bug, keep the traceback
            raise
        why = "no space left on device" if err.errno in (errno.ENOSPC, errno.EDQUOT) else (err.strerror or str(err))
        raise UserError(f"cannot write checkpoint {path}: {why}") from None


def remove_stale_temporaries(folder: Path) -> None:
    """Remove ``.NAME.tmp-PID`` files whose process is gone (a save killed midway)."""
    for p in folder.glob(".*.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _digests(sidecar: Path) -> list[str]:
    """The digests a sidecar vouches for (two during a save, see :func:`save`)."""
    try:
        return sidecar.read_text().split()
    except (OSError, UnicodeDecodeError):
        return []


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) after checking its checksum.

    Raises:
        UserError: the file is missing, truncated, corrupt, or not a checkpoint of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file() and _sha256(path) not in _digests(sidecar):
        raise UserError(f"{path} is corrupt or truncated (checksum mismatch)")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not ours
        raise UserError(f"{path} is not a readable checkpoint (truncated, or not written by torch.save)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path} is not a readable checkpoint: it holds Python objects besides tensors and "
                        "plain data, and unpickling those could run code") from None
    except Exception:  # a damaged archive
        raise UserError(f"{path} is not a readable checkpoint (truncated or damaged)") from None
    if not isinstance(ckpt, dict) or Key.MODEL not in ckpt or Key.RECIPE not in ckpt:
        raise UserError(f"{path} is not an lm.train checkpoint")
    return ckpt


def mismatch(e: Exception) -> str:
    """The telling line of a ``load_state_dict`` error (its first line is only a header)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return (lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0])[:300]


def step_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.pt"


def step_checkpoints(folder: Path) -> list[Path]:
    """``step-*.pt`` files in ``folder``, newest (highest step) first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def load_latest(folder: Path, map_location: str | torch.device = "cpu") -> tuple[dict, Path] | None:
    """The newest readable step checkpoint; a corrupt one is skipped with a warning."""
    for path in step_checkpoints(folder):
        try:
            return load(path, map_location), path
        except UserError as e:
            warnings.warn(f"skipping {e}; trying the previous checkpoint", stacklevel=2)
    return None


def prune(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest step checkpoints."""
    for path in step_checkpoints(folder)[keep:]:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
