"""Checkpoints: atomic checksummed round trip, truncation and bit flips detected,
``load_latest`` falls back past a bad file, ``prune`` keeps the newest, loading
never runs code from a pickle, a kill at every step of a save leaves a loadable pair,
and a full disk is one line with nothing left behind."""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lm import checkpoint
from pipeline.errors import UserError


def ckpt(step: int = 0) -> dict:
    """A checkpoint's kinds of content: tensors, nested dicts, numbers, strings, lists, None."""
    g = torch.Generator().manual_seed(step)
    return {
        "model": {"w": torch.randn(4, 3, generator=g), "b": torch.arange(3, dtype=torch.int64) + step},
        "optimizer": {"state": {0: {"step": torch.tensor(float(step))}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
        "recipe": {"model": {"cell": "gru", "hidden_size": 8}, "train": {"output_dir": "/x"}},
        "tokenizer": '{"version": "1.0"}',
        "progress": {"step": step, "best_val": float("inf"), "history": []},
        "kind": None,
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_with_a_checksum_beside_it_and_no_temporary_left(tmp_path):
    path = tmp_path / "deep" / "step-00000007.pt"
    checkpoint.save(ckpt(7), path)
    assert_same(checkpoint.load(path), ckpt(7))
    sidecar = path.with_name("step-00000007.pt.sha256")
    assert sidecar.read_text() == hashlib.sha256(path.read_bytes()).hexdigest() + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["step-00000007.pt", "step-00000007.pt.sha256"]


def test_save_over_an_existing_checkpoint_replaces_it_and_its_checksum(tmp_path):
    path = tmp_path / "best.pt"
    checkpoint.save(ckpt(1), path)
    checkpoint.save(ckpt(2), path)
    assert checkpoint.load(path)["progress"]["step"] == 2


def test_truncated_file_is_a_user_error(tmp_path):
    path = tmp_path / "step-00000001.pt"
    checkpoint.save(ckpt(1), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"step-00000001\.pt is corrupt or truncated \(checksum mismatch\)"):
        checkpoint.load(path)
    path.with_name(path.name + ".sha256").unlink()  # without its checksum: torch.load itself fails
    with pytest.raises(UserError, match=r"step-00000001\.pt is not a readable checkpoint"):
        checkpoint.load(path)


def test_one_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "step-00000001.pt"
    checkpoint.save(ckpt(1), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch"):
        checkpoint.load(path)


def test_missing_file_and_a_foreign_dict_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*nope.pt"):
        checkpoint.load(tmp_path / "nope.pt")
    checkpoint.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not an lm.train checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_load_latest_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(ckpt(step), checkpoint.step_path(tmp_path, step))
    newest = checkpoint.step_path(tmp_path, 3)
    newest.write_bytes(newest.read_bytes()[:100])  # killed mid-copy, say
    with pytest.warns(UserWarning, match=r"skipping .*step-00000003\.pt is corrupt or truncated"):
        found = checkpoint.load_latest(tmp_path)
    state, path = found
    assert path == checkpoint.step_path(tmp_path, 2)
    assert_same(state, ckpt(2))


def test_load_latest_returns_none_when_nothing_is_readable(tmp_path):
    assert checkpoint.load_latest(tmp_path / "absent") is None
    assert checkpoint.load_latest(tmp_path) is None
    checkpoint.save(ckpt(1), checkpoint.step_path(tmp_path, 1))
    checkpoint.step_path(tmp_path, 1).write_bytes(b"garbage")
    with pytest.warns(UserWarning):
        assert checkpoint.load_latest(tmp_path) is None


def test_load_latest_without_problems_warns_nothing(tmp_path):
    for step in (5, 10):
        checkpoint.save(ckpt(step), checkpoint.step_path(tmp_path, step))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checkpoint.load_latest(tmp_path)[1].name == "step-00000010.pt"


def test_step_checkpoints_orders_by_step_and_ignores_other_files(tmp_path):
    for step in (9, 10, 100, 2):
        checkpoint.save(ckpt(step), checkpoint.step_path(tmp_path, step))
    for name in ("best.pt", "step-x.pt", "step-00000011.pt.sha256", ".step-00000012.pt.tmp-1", "step-00000013.pth"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path)] == [
        "step-00000100.pt", "step-00000010.pt", "step-00000009.pt", "step-00000002.pt"]


def test_prune_keeps_the_k_newest_with_their_checksums(tmp_path):
    for step in range(1, 6):
        checkpoint.save(ckpt(step), checkpoint.step_path(tmp_path, step))
    checkpoint.save(ckpt(0), tmp_path / "best.pt")
    checkpoint.prune(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "best.pt", "best.pt.sha256", "step-00000004.pt", "step-00000004.pt.sha256",
        "step-00000005.pt", "step-00000005.pt.sha256"]
    checkpoint.prune(tmp_path, 5)  # fewer than keep: nothing to do
    assert len(checkpoint.step_checkpoints(tmp_path)) == 2


class _Payload:
    """Pickles as a call to os.system: ``torch.load(weights_only=False)`` would run it."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Custom:
    def __init__(self) -> None:
        self.x = 1


def test_a_pickle_that_runs_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    # a valid checksum beside it: only weights_only stands between the file and the shell
    checkpoint.save({"model": {"w": torch.zeros(1)}, "recipe": {}, "x": _Payload(marker)}, path)
    with pytest.raises(UserError, match=r"evil\.pt is not a readable checkpoint"):
        checkpoint.load(path)
    assert not marker.exists()
    # the payload is real: an unsafe load would have created the marker
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_a_pickled_custom_object_is_refused(tmp_path):
    path = tmp_path / "custom.pt"
    checkpoint.save({"model": {}, "recipe": _Custom()}, path)
    with pytest.raises(UserError, match="is not a readable checkpoint"):
        checkpoint.load(path)


# --------------------------------------------------------------------------- atomicity and resource faults


class _Killed(BaseException):
    """A kill: not an Exception, so no cleanup in ``save`` runs (as with SIGKILL)."""


def _kill_at(monkeypatch, n: int) -> list[str]:
    """Make the ``n``-th file-system step of a save raise ``_Killed``; returns the step log."""
    log: list[str] = []

    def step(name, fn):
        def wrapped(*args, **kwargs):
            if len(log) == n:
                raise _Killed(name)
            log.append(name)
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(checkpoint.torch, "save", step("torch.save", torch.save))
    monkeypatch.setattr(checkpoint.os, "fsync", step("fsync", os.fsync))
    monkeypatch.setattr(checkpoint.os, "replace", step("replace", os.replace))
    return log


def test_a_kill_at_every_step_of_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    checkpoint.save(ckpt(1), path)
    n, outcomes = 0, []
    while True:
        with monkeypatch.context() as m:
            log = _kill_at(m, n)
            try:
                checkpoint.save(ckpt(2), path)
                finished = True
            except _Killed:
                finished = False
        loaded = checkpoint.load(path)  # never "corrupt": the pair always verifies
        step = loaded["progress"]["step"]
        assert step in (1, 2)
        outcomes.append(step)
        if finished:
            break
        checkpoint.save(ckpt(1), path)  # back to the old pair for the next kill point
        n += 1
    # the sequence: torch.save, fsync(file), then 3 fsyncs + 2 renames for the pair, then the last sidecar
    assert log == ["torch.save", "fsync", "fsync", "replace", "fsync", "replace", "fsync", "fsync", "replace", "fsync"]
    assert outcomes == [1] * 6 + [2] * 5  # the switch happens at the checkpoint's own rename
    assert path.with_name("best.pt.sha256").read_text() == hashlib.sha256(path.read_bytes()).hexdigest() + "\n"


def test_a_kill_mid_save_without_an_earlier_checkpoint_leaves_none_or_the_new_one(tmp_path, monkeypatch):
    path = tmp_path / "step-00000001.pt"
    for n in range(10):
        with monkeypatch.context() as m:
            _kill_at(m, n)
            with pytest.raises(_Killed):
                checkpoint.save(ckpt(1), path)
        if path.exists():
            assert checkpoint.load(path)["progress"]["step"] == 1
        else:
            assert checkpoint.load_latest(tmp_path) is None
        path.unlink(missing_ok=True)


def test_leftover_temporaries_of_killed_processes_are_removed_by_the_next_save(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".best.pt.tmp-{dead.pid}", tmp_path / f".step-00000004.pt.sha256.tmp-{dead.pid}"]
    live = tmp_path / f".best.pt.tmp-{os.getppid()}"  # a process still running: maybe saving right now
    for p in (*stale, live):
        p.write_bytes(b"partial")
    checkpoint.save(ckpt(5), checkpoint.step_path(tmp_path, 5))
    assert not any(p.exists() for p in stale) and live.exists()


def test_disk_full_is_one_line_naming_the_path_and_keeps_earlier_checkpoints(tmp_path):
    """A real ENOSPC from the kernel: the temporary file is a link to /dev/full."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    earlier = checkpoint.step_path(tmp_path, 1)
    checkpoint.save(ckpt(1), earlier)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    path = checkpoint.step_path(tmp_path, 2)
    for _ in range(2):  # every retry: one line, nothing left behind
        tmp = tmp_path / f".{path.name}.tmp-{os.getpid()}"
        tmp.symlink_to("/dev/full")
        with pytest.raises(UserError) as e:
            checkpoint.save(ckpt(2), path)
        assert str(e.value) == f"cannot write checkpoint {path}: no space left on device"
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert checkpoint.load(earlier)["progress"]["step"] == 1


@pytest.mark.parametrize("at", ["torch.save", "replace"])
def test_disk_full_at_any_step_removes_the_temporaries_and_keeps_a_valid_pair(tmp_path, monkeypatch, at):
    path = tmp_path / "best.pt"
    checkpoint.save(ckpt(1), path)

    def full(*args, **kwargs):
        if at == "torch.save":
            args[1].write(b"some bytes")  # part of it made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch if at == "torch.save" else checkpoint.os, at.split(".")[-1], full)
    with pytest.raises(UserError, match=r"^cannot write checkpoint .*best\.pt: no space left on device$"):
        checkpoint.save(ckpt(2), path)
    monkeypatch.setattr(checkpoint.os, "replace", os.replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "best.pt.sha256"]
    assert checkpoint.load(path)["progress"]["step"] == 1


def test_an_unwritable_folder_is_a_user_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^cannot write checkpoint .*file/best\.pt: "):
        checkpoint.save(ckpt(1), tmp_path / "file" / "best.pt")


def test_prune_orders_by_step_number_not_by_name(tmp_path):
    # step numbers past the zero padding: a name sort would call step-100000000 the oldest
    for step in (99_999_999, 100_000_000, 7):
        checkpoint.save(ckpt(1), checkpoint.step_path(tmp_path, step))
    checkpoint.prune(tmp_path, 1)
    assert [p.name for p in checkpoint.step_checkpoints(tmp_path)] == ["step-100000000.pt"]
