"""PackedCollator / PadCollator: exact tensors, conformance with torch's packing, every
input form, errors, batch methods, and a DataLoader with workers and pin_memory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence
from torch.utils.data import DataLoader, Dataset

from pipeline.collate import PackedBatch, PackedCollator, PadCollator, PaddedBatch
from pipeline.sampling import BucketBatchSampler

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def forms(seqs: list[list[int]]) -> dict[str, list]:
    """The same samples in every form a collator accepts."""
    return {
        "list": seqs,
        "tuple": [tuple(s) for s in seqs],
        "uint16": [np.asarray(s, dtype=np.uint16) for s in seqs],
        "int32": [np.asarray(s, dtype=np.int32) for s in seqs],
        "tensor": [torch.tensor(s) for s in seqs],
        "row": [{"input_ids": s, "length": len(s)} for s in seqs],
        "row-numpy": [{"input_ids": np.asarray(s, dtype=np.uint16)} for s in seqs],
    }


def reference(seqs: list[list[int]]):
    """torch's own packing: pad_sequence + pack_padded_sequence(enforce_sorted=False)."""
    ts = [torch.tensor(s) for s in seqs]
    lengths = torch.tensor([len(s) for s in seqs])
    return pack_padded_sequence(pad_sequence(ts, batch_first=True), lengths, batch_first=True, enforce_sorted=False)


# ------------------------------------------------------------------ exact


def test_seed_conformance_ten_sequences():
    lengths = [20, 5, 8, 10, 15, 18, 17, 6, 6, 18]
    seqs = [list(range(100 * i + 1, 100 * i + 1 + n)) for i, n in enumerate(lengths)]  # no pad id (0) inside
    batch = PackedCollator(pad_id=0, shift=False)(seqs)

    assert batch.inputs.batch_sizes.tolist() == [10, 10, 10, 10, 10, 9, 7, 7, 6, 6, 5, 5, 5, 5, 5, 4, 4, 3, 1, 1]
    assert batch.inputs.data.numel() == batch.num_tokens == 123
    assert batch.targets is None
    assert batch.indices.tolist() == [0, 5, 9, 6, 4, 3, 2, 7, 8, 1]  # longest first, ties in caller order
    assert torch.equal(batch.indices, batch.inputs.sorted_indices)
    assert batch.lengths.dtype == torch.int64 and batch.lengths.tolist() == lengths

    padded, out_lengths = pad_packed_sequence(batch.inputs, batch_first=True, padding_value=0)
    expected = torch.zeros(10, 20, dtype=torch.int64)
    for i, s in enumerate(seqs):
        expected[i, : len(s)] = torch.tensor(s)
    assert torch.equal(padded, expected)
    assert out_lengths.tolist() == lengths
    assert batch.inputs.data[:10].tolist() == [1, 501, 901, 601, 401, 301, 201, 701, 801, 101]  # step 0, sorted


def test_shift_makes_teacher_forcing_pairs_exactly():
    batch = PackedCollator(shift=True)([[1, 2, 3], [4, 5], [6, 7, 8, 9]])
    # sorted: [6,7,8,9] [1,2,3] [4,5] -> inputs [6,7,8] [1,2] [4], targets [7,8,9] [2,3] [5]
    assert batch.inputs.data.tolist() == [6, 1, 4, 7, 2, 8]
    assert batch.targets.data.tolist() == [7, 2, 5, 8, 3, 9]
    assert batch.inputs.batch_sizes.tolist() == batch.targets.batch_sizes.tolist() == [3, 2, 1]
    assert batch.inputs.sorted_indices.tolist() == [2, 0, 1]
    assert batch.inputs.unsorted_indices.tolist() == [1, 2, 0]
    assert batch.lengths.tolist() == [2, 1, 3]
    assert batch.num_tokens == 6


def test_equal_lengths_fast_path_is_exact():
    batch = PackedCollator(shift=True)([[1, 2, 3], [4, 5, 6]])
    assert batch.inputs.data.tolist() == [1, 4, 2, 5]
    assert batch.targets.data.tolist() == [2, 5, 3, 6]
    assert batch.inputs.batch_sizes.tolist() == [2, 2]
    assert batch.indices.tolist() == [0, 1] and batch.inputs.unsorted_indices.tolist() == [0, 1]
    single = PackedCollator(shift=False)([np.array([7, 8, 9], dtype=np.uint16)])
    assert single.inputs.data.tolist() == [7, 8, 9] and single.inputs.batch_sizes.tolist() == [1, 1, 1]


@pytest.mark.parametrize("shift", [False, True])
def test_every_input_form_gives_the_same_batch(shift):
    seqs = [[5, 3, 9, 2], [7, 1], [4, 4, 4, 4, 6], [8, 2], [3, 3, 3]]
    batches = {name: PackedCollator(shift=shift)(xs) for name, xs in forms(seqs).items()}
    want = batches["list"]
    for name, b in batches.items():
        assert b.inputs.data.dtype == torch.int64, name
        for a, w in [(b.inputs, want.inputs), (b.targets, want.targets)]:
            if w is None:
                assert a is None
                continue
            for x, y in zip(a, w):
                assert torch.equal(x, y), name
        assert torch.equal(b.lengths, want.lengths) and torch.equal(b.indices, want.indices), name


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize(
    "lengths",
    [
        [4, 4, 4, 4, 4],  # one run: transpose
        [3, 6, 3, 6, 3],  # two runs: block copies
        [2, 7, 5, 7, 2, 5],  # three
        [3, 5, 3, 9, 4, 4, 9, 5],  # four
        [9, 8, 7, 6, 5, 4, 3, 2],  # eight: index gather
    ],
)
def test_every_packing_path_matches_torch(lengths, shift):
    rng = np.random.default_rng(sum(lengths))
    seqs = [rng.integers(1, 60000, n).tolist() for n in lengths]
    batch = PackedCollator(shift=shift)([np.asarray(s, dtype=np.uint16) for s in seqs])
    order = batch.indices.tolist()
    assert order == sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable, longest first
    ref_in = reference([seqs[i][: len(seqs[i]) - shift] for i in order])
    assert torch.equal(batch.inputs.data, ref_in.data)
    assert torch.equal(batch.inputs.batch_sizes, ref_in.batch_sizes)
    if shift:
        ref_tgt = reference([seqs[i][1:] for i in order])
        assert torch.equal(batch.targets.data, ref_tgt.data)
        assert batch.targets.batch_sizes is batch.inputs.batch_sizes
    assert batch.lengths.tolist() == [n - shift for n in lengths]


sequences = st.lists(st.lists(st.integers(1, 60000), min_size=1, max_size=12), min_size=1, max_size=10)


@settings(max_examples=80, deadline=None)
@given(seqs=sequences, same_length=st.booleans())
def test_matches_torch_packing(seqs, same_length):
    if same_length:  # exercise the equal-lengths path as often as the general one
        seqs = [s[:1] * len(seqs[0]) for s in seqs]
    batch = PackedCollator(shift=False)([np.asarray(s, dtype=np.uint16) for s in seqs])
    ref = reference(seqs)
    assert torch.equal(batch.inputs.batch_sizes, ref.batch_sizes)
    # torch sorts ties in no particular order; ours keeps them stable, so compare in our order
    ordered = [seqs[i] for i in batch.indices.tolist()]
    assert torch.equal(batch.inputs.data, reference(ordered).data)
    padded, lengths = pad_packed_sequence(batch.inputs, batch_first=True)
    assert torch.equal(padded, pad_sequence([torch.tensor(s) for s in seqs], batch_first=True))
    assert lengths.tolist() == [len(s) for s in seqs] == batch.lengths.tolist()


@settings(max_examples=60, deadline=None)
@given(seqs=st.lists(st.lists(st.integers(1, 500), min_size=2, max_size=12), min_size=1, max_size=10))
def test_shifted_targets_follow_inputs(seqs):
    batch = PackedCollator(shift=True)(seqs)
    ins, in_len = pad_packed_sequence(batch.inputs, batch_first=True)
    tgt, tgt_len = pad_packed_sequence(batch.targets, batch_first=True)
    assert torch.equal(in_len, tgt_len) and in_len.tolist() == [len(s) - 1 for s in seqs]
    for i, s in enumerate(seqs):
        assert ins[i, : len(s) - 1].tolist() == s[:-1]
        assert tgt[i, : len(s) - 1].tolist() == s[1:]


def test_cross_entropy_on_packed_targets_needs_no_mask():
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    batch = PackedCollator(shift=True)(seqs)
    logits = torch.nn.functional.one_hot(batch.targets.data, 10).float() * 5  # (N, V) always right
    packed_loss = F.cross_entropy(logits, batch.targets.data)
    pad = PadCollator(shift=True)(seqs)
    padded_logits = F.one_hot(pad.targets.clamp(min=0), 10).float() * 5  # (B, T, V)
    padded_loss = F.cross_entropy(padded_logits.transpose(1, 2), pad.targets)  # -100 is ignored
    assert batch.num_tokens == pad.num_tokens == 6
    torch.testing.assert_close(packed_loss, padded_loss)


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "collator, samples, match",
    [
        (PackedCollator(shift=True), [[1, 2], [3], [4, 5]], r"at least 2 tokens .* batch positions \[1\] have \[1\]"),
        (PackedCollator(shift=False), [[1, 2], []], r"at least 1 token .* batch positions \[1\] have \[0\]"),
        (PadCollator(shift=True), [np.array([1], dtype=np.uint16)], r"at least 2 tokens"),
        (PackedCollator(), [], "empty batch"),
        (PackedCollator(shift=False), [np.zeros((2, 2), dtype=np.int64)], "1-D"),
    ],
)
def test_short_or_malformed_samples_are_clear_errors(collator, samples, match):
    with pytest.raises(ValueError, match=match):
        collator(samples)


def test_non_integer_ids_are_rejected():
    with pytest.raises(TypeError, match="integers"):
        PackedCollator(shift=False)([np.array([1.0, 2.0]), np.array([3.0])])


# ---------------------------------------------------------- batch methods


def test_padded_and_to():
    batch = PackedCollator(pad_id=9, shift=True)([[1, 2, 3], [4, 5, 6, 7, 8], [3, 1]])
    ids, lengths, mask = batch.padded()
    assert ids.tolist() == [[1, 2, 9, 9], [4, 5, 6, 7], [3, 9, 9, 9]]
    assert lengths.tolist() == [2, 4, 1]
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]

    moved = batch.to("cpu", non_blocking=True)
    assert isinstance(moved, PackedBatch) and moved.pad_id == 9
    assert torch.equal(moved.inputs.data, batch.inputs.data) and torch.equal(moved.targets.data, batch.targets.data)
    assert moved.lengths.device.type == "cpu" and moved.indices.device.type == "cpu"


def _tensors(batch) -> dict[str, torch.Tensor]:
    """Every tensor a batch holds, by name (PackedSequence fields flattened)."""
    out = {}
    for name, value in vars(batch).items():
        if isinstance(value, torch.nn.utils.rnn.PackedSequence):
            out.update({f"{name}.{k}": v for k, v in value._asdict().items() if v is not None})
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


PIN_EXEMPT = {"inputs.batch_sizes", "targets.batch_sizes"}  # PackedSequence keeps batch_sizes as is (torch's design)


def _batches():
    return [PackedCollator(pad_id=9, shift=True)([[1, 2, 3], [4, 5, 6, 7, 8], [3, 1]]),
            PadCollator(pad_id=0, shift=True)([[1, 2, 3], [4, 5]])]


@pytest.mark.parametrize("batch", _batches(), ids=["packed", "padded"])
def test_pin_memory_pins_every_tensor_with_an_accelerator(batch, monkeypatch):
    """The pinning code itself, on any machine: with an accelerator every tensor is
    replaced by its pinned copy (``Tensor.pin_memory`` recorded), values and pad_id kept."""
    pinned_ids = set()

    def fake_pin(t: torch.Tensor) -> torch.Tensor:
        copy = t.clone()
        pinned_ids.add(id(copy))
        return copy

    monkeypatch.setattr("pipeline.collate._accelerator_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    assert type(out) is type(batch) and out is not batch and getattr(out, "pad_id", 0) == getattr(batch, "pad_id", 0)
    before, after = _tensors(batch), _tensors(out)
    assert before.keys() == after.keys()
    for name, t in after.items():
        assert torch.equal(t, before[name])
        assert (id(t) in pinned_ids) == (name not in PIN_EXEMPT), name


@pytest.mark.parametrize("batch", _batches(), ids=["packed", "padded"])
def test_pin_memory_without_an_accelerator_returns_the_batch(batch, monkeypatch):
    monkeypatch.setattr("pipeline.collate._accelerator_available", lambda: False)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pytest.fail("pinned without an accelerator"))
    assert batch.pin_memory() is batch


def test_pin_memory_real_call_on_this_machine():
    """The real path, unpatched: pins where torch can, returns the batch where torch would raise."""
    acc = getattr(torch, "accelerator", None)  # torch >= 2.6; CUDA before
    accelerator = acc.is_available() if acc is not None else torch.cuda.is_available()
    for batch in _batches():
        out = batch.pin_memory()
        if accelerator:
            assert all(t.is_pinned() for name, t in _tensors(out).items() if name not in PIN_EXEMPT)
        else:
            with pytest.raises(RuntimeError):
                torch.empty(1).pin_memory()  # why the method must not call it here
            assert out is batch


@pytest.mark.cuda
def test_pin_memory_on_cuda_is_page_locked_and_copies_asynchronously():
    for batch in _batches():
        out = batch.pin_memory()
        tensors = _tensors(out)
        assert all(t.is_pinned() for name, t in tensors.items() if name not in PIN_EXEMPT)
        moved = out.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        for name, t in _tensors(moved).items():
            assert torch.equal(t.cpu(), tensors[name]), name


def test_pad_collator_exact():
    out = PadCollator(pad_id=0, shift=True, pad_to_multiple_of=4, target_pad_id=-1)([[1, 2, 3], [4, 5, 6, 7, 8, 9]])
    assert isinstance(out, PaddedBatch)
    assert out.inputs.tolist() == [[1, 2, 0, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 0, 0, 0]]
    assert out.targets.tolist() == [[2, 3, -1, -1, -1, -1, -1, -1], [5, 6, 7, 8, 9, -1, -1, -1]]
    assert out.mask.sum(1).tolist() == out.lengths.tolist() == [2, 5]
    assert out.num_tokens == 7
    plain = PadCollator(pad_id=7, shift=False)([np.array([1, 2], dtype=np.uint16), np.array([3], dtype=np.uint16)])
    assert plain.inputs.tolist() == [[1, 2], [3, 7]] and plain.targets is None
    assert plain.inputs.dtype == torch.int64 and plain.mask.tolist() == [[True, True], [True, False]]


def test_packed_and_padded_agree():
    seqs = [[5, 3, 9, 2], [7, 1], [4, 4, 4, 4, 6]]
    ids, lengths, mask = PackedCollator(shift=True)(seqs).padded()
    pad = PadCollator(shift=True)(seqs)
    assert torch.equal(ids, pad.inputs) and torch.equal(mask, pad.mask) and torch.equal(lengths, pad.lengths)


# ------------------------------------------------------------- DataLoader


class _Views(Dataset):
    """What the prepared dataset returns: uint16 views into one flat array."""

    def __init__(self, seqs: list[list[int]]) -> None:
        self.flat = np.concatenate([np.asarray(s, dtype=np.uint16) for s in seqs])
        self.starts = np.concatenate(([0], np.cumsum([len(s) for s in seqs])))
        self.lengths = np.diff(self.starts)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.flat[self.starts[i] : self.starts[i + 1]]


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_dataloader_with_workers_and_pin_memory():
    """With CUDA the loader's pin thread calls PackedBatch.pin_memory (checked); without,
    torch disables pinning and warns."""
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 1000, n).tolist() for n in rng.integers(2, 40, 97)]
    data = _Views(seqs)
    sampler = BucketBatchSampler(data.lengths, batch_size=8, seed=5)
    collate = PackedCollator(shift=True)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate, num_workers=2, pin_memory=True)
    got = list(loader)
    plan = sampler.plan(0)
    assert len(got) == len(plan) == len(sampler) == 13
    for batch, ids in zip(got, plan):
        want = collate([seqs[i] for i in ids])
        assert isinstance(batch, PackedBatch)
        assert torch.equal(batch.inputs.data, want.inputs.data) and torch.equal(batch.targets.data, want.targets.data)
        assert torch.equal(batch.inputs.batch_sizes, want.inputs.batch_sizes)
        assert batch.indices.tolist() == list(range(len(ids)))  # the sampler already sorts longest first
        assert batch.inputs.data.is_pinned() == torch.cuda.is_available()
    assert sum(b.num_tokens for b in got) == sum(len(s) - 1 for s in seqs)


def test_modules_import_only_torch_and_numpy():
    code = (
        "import sys, torch, numpy; before = set(sys.modules); "
        "import pipeline.sampling, pipeline.collate; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['pipeline']"
