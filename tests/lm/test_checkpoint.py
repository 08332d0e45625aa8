"""Checkpoints: atomic checksummed round trip, truncation and bit flips detected,
``load_latest`` falls back past a bad file, ``prune`` keeps the newest, and loading
never runs code from a pickle."""
from __future__ import annotations

import hashlib
import os
import warnings

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
