"""Which run owns a ``train.output_dir``: identity, lock, and what a resume may change.

One mechanism for every tool that writes into a training folder.

**Identity.** ``run.json`` in the folder records the run that owns it: ``run_id`` (time +
random suffix), ``created``, ``host``, ``pid`` (the latest process to train in it) and
``recipe_fingerprint`` (a hash of the keys a resume may not change, see below). Every
checkpoint carries the run id (:meth:`RunDir.checkpoint_fields`), and a checkpoint being
resumed is checked against the folder's run (:meth:`RunDir.check_checkpoint`).

**Lock.** While a run trains it holds ``fcntl.flock`` on ``.lock`` in the folder. The
kernel drops the lock when the process dies (``kill -9`` included), so a lock left by a
killed run is simply taken over; the file itself stays (deleting lock files races). The
holder writes ``pid host run_id`` into it, for the message a second trainer gets:
``train.output_dir=… is in use by pid N on HOST (run …)``. Caveats: forked children (e.g.
DataLoader workers) inherit the lock and hold it until they exit; on network filesystems
``flock`` is only as good as the filesystem's lock support (NFSv4: fine).

**Claiming** (:func:`claim`, at the start of training, before anything is written):

* a new run (``train.resume`` null) refuses a folder that holds another run's work —
  ``checkpoints/step-*.pt``, ``checkpoints/best.pt``, a non-empty ``metrics.jsonl`` or
  ``result.json`` — with one line offering ``train.resume=auto`` or another/empty
  ``train.output_dir``. A folder holding only ``recipe.yaml``/``run.json`` of a run that
  never got going is reused under a new run id.
* ``train.resume=auto`` continues the folder's run (its ``run.json``); a folder written
  before run ids existed is adopted (``"adopted": true``) and its id-less checkpoints are
  accepted. An empty folder starts a new run.
* ``train.resume=PATH`` into a folder that holds a run: the checkpoint must belong to that
  run. Into a fresh folder: a new run that starts from PATH (a fork; ``resumed_from`` names
  the parent run and checkpoint).

A failure before the run wrote anything (``with claim(...) as run:`` leaving by an
exception) removes what the claim created, so a refused or failed start leaves nothing.

**Resume changes** (:func:`resume_changes`): the recipe saved in the checkpoint and the
new one are compared key by key.

* Applied (returned, the trainer puts them in effect and records them): ``train.``
  ``lr`` (the new base rate; a plateau-annealed rate keeps its annealing factor),
  ``min_lr``, ``plateau_factor``, ``clip``, ``epochs``, ``max_steps``, ``max_time``,
  ``eval_every``, ``log_every``, ``checkpoint_every``, ``keep_checkpoints``, ``prompts``,
  ``sample_tokens``, ``num_workers``, ``plot``, ``device``, ``amp``, ``max_nonfinite``,
  ``resume``, ``output_dir``, ``progress_every``, ``eval_batch_size`` (evaluation only),
  ``teacher_forcing.*`` (a pure function of the step), and
  ``data.output``, ``data.num_proc``, ``data.batch_size`` (where and how fast, not what;
  the trainer separately checks the tokenizer and vocabulary).
* Refused (:class:`UserError` naming the key, old and new value): everything else — all
  of ``model.*`` (the weights' shape and regularisers), the rest of ``data.*`` (the ids the
  sampler's position refers to), and ``train.`` ``seed``, ``optimizer``, ``weight_decay``
  (restored with the optimizer state), ``max_tokens``, ``batch_size``, ``mode``, ``bptt``,
  ``variable_bptt`` (the epoch's batch plan), ``average``, ``nonmono``, ``warmup_steps`` and ``schedule`` (the shape of the learning-rate curve). A key
  added later is refused until it is listed in :data:`APPLIED`; a key only one of the two
  recipes has (a checkpoint of another toolkit version) is not compared.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from lm.checkpoint import Key
from pipeline.errors import UserError

RUN_FILE = "run.json"
LOCK_FILE = ".lock"

# dotted keys (or "section.prefix.*") a resume applies; everything else is refused
APPLIED = frozenset({
    "train.lr", "train.min_lr", "train.plateau_factor", "train.clip", "train.epochs", "train.max_steps",
    "train.max_time", "train.eval_every", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.prompts", "train.sample_tokens", "train.num_workers", "train.plot", "train.device", "train.amp",
    "train.max_nonfinite", "train.resume", "train.output_dir", "train.teacher_forcing.*",
    "train.progress_every", "train.eval_batch_size",
    "data.output", "data.num_proc", "data.batch_size",
})
_HOW = "continue it with train.resume=auto, or choose another or an empty train.output_dir"


def _applied(key: str) -> bool:
    return key in APPLIED or any(a.endswith(".*") and key.startswith(a[:-1]) for a in APPLIED)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def resume_changes(saved: dict, new: dict) -> list[str]:
    """The recipe keys a resume changes, checked against the rules in the module docstring.

    Args:
        saved: the recipe stored in the checkpoint (``pipeline.config.to_dict`` form).
        new: the recipe of this run, same form.

    Returns:
        The dotted keys whose value differs and that the resume applies, sorted.

    Raises:
        UserError: a changed key that a resume cannot apply (the first one, sorted).
    """
    a, b = _flatten(saved), _flatten(new)
    # a key one side lacks is a checkpoint from another version of the toolkit: nothing to compare
    changed = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    for key in changed:
        if not _applied(key):
            raise UserError(
                f"{key}={_show(b.get(key))} differs from the checkpoint's {key}={_show(a.get(key))}, and a resume cannot "
                f"change it; keep the old value, or start a new run in another train.output_dir"
            )
    return changed


def _show(v: Any) -> str:
    return "null" if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def recipe_fingerprint(recipe: dict) -> str:
    """A hash of the recipe keys a resume may not change (what makes two runs the same run)."""
    fixed = {k: v for k, v in _flatten(recipe).items() if not _applied(k)}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _precious(folder: Path) -> list[str]:
    """What in ``folder`` a new run would destroy: another run's checkpoints, metrics, result."""
    found = []
    ckpts = folder / "checkpoints"
    if ckpts.is_dir() and any(p.name == "best.pt" or (p.name.startswith("step-") and p.name.endswith(".pt"))
                              for p in ckpts.iterdir()):
        found.append("checkpoints")
    metrics = folder / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    if (folder / "result.json").exists():
        found.append("result.json")
    return found


class RunDir:
    """A claimed ``train.output_dir``: the run's identity, and the lock held while training.

    Use as a context manager (or call :meth:`release`). Made by :func:`claim`.
    """

    def __init__(self, folder: Path, info: dict, fd: int, created: list[Path]) -> None:
        self.folder, self.info, self._fd, self._created = folder, info, fd, created

    @property
    def run_id(self) -> str:
        return self.info["run_id"]

    def checkpoint_fields(self) -> dict:
        """Fields to store in every checkpoint of this run (``{**state, **run.checkpoint_fields()}``)."""
        return {Key.RUN_ID: self.run_id}

    def check_checkpoint(self, ckpt: dict, path: Path) -> None:
        """Check that a checkpoint about to be resumed belongs to this folder's run.

        A fresh run (one that :func:`claim` started for ``resume=PATH`` into an empty
        folder) accepts any checkpoint and records it as its parent.

        Raises:
            UserError: the checkpoint belongs to another run.
        """
        theirs = ckpt.get(Key.RUN_ID)
        if self.info.pop("fresh", False):
            self.info["resumed_from"] = {"run_id": theirs, "checkpoint": str(path)}
            return
        if theirs == self.run_id or (theirs is None and self.info.get("adopted")):
            return
        raise UserError(
            f"{path} belongs to {'run ' + theirs if theirs else 'no recorded run'}, but train.output_dir={self.folder} "
            f"holds run {self.run_id}; resume it into its own folder, or into an empty train.output_dir"
        )

    def start(self) -> None:
        """Record the run in ``run.json``. Called once the start is settled (the resume checks
        passed), so a start refused after the claim leaves the folder as it was."""
        self._write_info()

    def release(self, failed: bool = False, *, refused: bool = False) -> None:
        """Drop the lock. ``failed``: remove what the claim created if nothing else was written
        since (``refused``: the claim itself failed, so whatever else is there is not ours)."""
        if self._fd < 0:
            return
        if failed and self._created:
            rest = {p.name for p in self.folder.iterdir()} - {RUN_FILE, LOCK_FILE} if self.folder.is_dir() else set()
            if refused or not rest:
                for p in self._created:  # files first, then the folders the claim made
                    try:
                        p.rmdir() if p.is_dir() else p.unlink(missing_ok=True)
                    except OSError:
                        pass  # something else appeared in it meanwhile: keep it
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = -1

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(failed=exc_type is not None and not issubclass(exc_type, SystemExit))

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def _write_info(self) -> None:
        info = {k: v for k, v in self.info.items() if k != "fresh"}
        tmp = self.folder / f".{RUN_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, self.folder / RUN_FILE)


def claim(folder: str | Path, *, resume: str | None, recipe: dict) -> RunDir:
    """Lock ``folder`` for this run and settle which run owns it (rules: module docstring).

    Call before anything is written into the folder; hold the result until training ends,
    and call :meth:`RunDir.start` once the run's setup succeeded (it writes ``run.json``).

    Args:
        folder: ``train.output_dir``.
        resume: ``train.resume`` (``None``, ``"auto"`` or a checkpoint path).
        recipe: this run's recipe as a dict (for the fingerprint in ``run.json``).

    Returns:
        The claimed :class:`RunDir`, lock held.

    Raises:
        UserError: the folder is in use by another process, holds another run (new run),
            is not a folder, or cannot be written.
    """
    folder = Path(folder)
    created: list[Path] = []  # what this claim makes, in removal order: files, then folders innermost first
    try:
        p = folder
        while not p.exists() and p != p.parent:
            created.append(p)
            p = p.parent
        if not p.is_dir():
            raise UserError(f"train.output_dir={folder}: {p} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / LOCK_FILE
        if not lock.exists():
            created.insert(0, lock)
        fd = _lock(folder, lock)
    except OSError as e:
        for p in created:  # innermost first; only folders this claim made, and only if empty
            if p.is_dir():
                try:
                    p.rmdir()
                except OSError:
                    pass
        if isinstance(e, PermissionError) or e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise UserError(f"train.output_dir={folder}: cannot write there ({e.strerror})") from None
        raise
    try:
        info = _settle(folder, resume, recipe, created)
        run = RunDir(folder, info, fd, created)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {info['run_id']}\n".encode(), 0)
        return run
    except BaseException:
        RunDir(folder, {}, fd, created).release(failed=True, refused=True)
        raise


def _lock(folder: Path, lock: Path) -> int:
    """Take the folder's flock, or raise naming the holder."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" + (f" (run {holder[2]})" if len(holder) > 2 else "") \
                if len(holder) >= 2 else "another process"
            raise UserError(f"train.output_dir={folder} is in use by {who}; wait for it to finish, "
                            "or choose another train.output_dir") from None
        # the file may have been replaced between open and flock: the lock must be on the current one
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _settle(folder: Path, resume: str | None, recipe: dict, created: list[Path]) -> dict:
    """The run identity for this start, per the claiming rules."""
    run_file = folder / RUN_FILE
    old = None
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text())
            if not isinstance(old, dict) or not isinstance(old.get("run_id"), str):
                old = None
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
    precious = _precious(folder)
    here = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
    if resume is None and precious:
        who = f"run {old['run_id']}" if old else "another run"
        raise UserError(f"train.output_dir={folder} already holds {who} ({', '.join(precious)}); {_HOW}")
    if resume is not None and old is not None and (precious or resume == "auto"):
        return {**old, **here}
    if resume is not None and precious:  # written before run ids: adopt it
        info = _new(recipe, here)
        info["adopted"] = True
        return info
    if not run_file.exists():
        created.insert(0, run_file)
    info = _new(recipe, here)
    if resume not in (None, "auto"):
        info["fresh"] = True
    return info


def _new(recipe: dict, here: dict) -> dict:
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(4)
    return {"run_id": run_id, "created": _now(), **here, "recipe_fingerprint": recipe_fingerprint(recipe)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
