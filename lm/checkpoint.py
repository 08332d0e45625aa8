"""Checkpoints: atomic writes, checksums, safe loading.

A checkpoint is a ``torch.save`` file of plain data — tensors, numbers, strings, lists,
dicts — so it loads with ``torch.load(weights_only=True)`` and cannot run code. The
recipe is stored as a dict and the tokenizer as its JSON text, never pickled objects.

Writes go to a temporary file that is fsync'ed and renamed, so a kill at any moment
leaves either the old file or the new one. A ``.sha256`` file beside each checkpoint
lets a truncated or corrupted file be told apart from a good one.
"""
from __future__ import annotations

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


def save(obj: dict, path: Path) -> None:
    """Write ``obj`` to ``path`` atomically (temp file, fsync, rename) with its checksum."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    digest = _sha256(tmp)
    _write_atomic(path.with_name(path.name + ".sha256"), digest + "\n")
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) after checking its checksum.

    Raises:
        UserError: the file is missing, truncated, corrupt, or not a checkpoint of ours.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    sidecar = path.with_name(path.name + ".sha256")
    if sidecar.is_file() and sidecar.read_text().strip() != _sha256(path):
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
    if not isinstance(ckpt, dict) or "model" not in ckpt or "recipe" not in ckpt:
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


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
