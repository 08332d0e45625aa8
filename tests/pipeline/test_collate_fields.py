"""The rows' other fields through PackedCollator / PadCollator: every field in the caller's
order (the order of lengths, of pad_packed_sequence and of an RNN's h_n), token-level fields
packed exactly like the ids, errors that name the row and the field, and the same through
DataLoader workers, BucketBatchSampler over a datasets.Dataset and StreamBucketBatcher."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence
from torch.utils.data import DataLoader

from pipeline.collate import PackedBatch, PackedCollator, PadCollator, PaddedBatch
from pipeline.sampling import BucketBatchSampler
from pipeline.streaming import StreamBucketBatcher


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead on a loaded 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_rows(lengths: list[int], seed: int = 0) -> list[dict]:
    """Row i: ids 100*i+1, ...; its label 10*length + i, so a label names its row and length;
    tags (one per id) the id mod 7, so a packed tag names its token."""
    rows = []
    for i, n in enumerate(lengths):
        ids = list(range(100 * i + 1, 100 * i + 1 + n))
        rows.append({"input_ids": ids, "label": 10 * n + i, "id": f"row-{i}", "tags": [t % 7 for t in ids]})
    return rows


def padded(rows: list[dict], name: str, T: int, cut: int, fill: int) -> torch.Tensor:
    """``rows[i][name][:len - cut]`` padded with ``fill`` to ``T``, caller's order: what a field must unpack to."""
    out = torch.full((len(rows), T), fill, dtype=torch.int64)
    for i, r in enumerate(rows):
        v = r[name][: len(r[name]) - cut]
        out[i, : len(v)] = torch.tensor(v)
    return out


# ------------------------------------------------------------- per-row fields


def test_every_field_in_the_callers_order_with_exact_values_and_dtypes():
    lengths = [3, 5, 2, 5, 4]
    rows = make_rows(lengths)
    for i, r in enumerate(rows):
        r.update(score=i / 4, keep=i % 2 == 0, vec=np.array([i, -i], dtype=np.int32), f16=np.float16(i),
                 ragged=list(range(i)), note=None if i == 2 else "x")
    batch = PackedCollator(shift=False)(rows)
    assert batch.indices.tolist() == [1, 3, 4, 0, 2]  # the collator did sort
    f = batch.fields
    assert list(f) == ["label", "id", "tags", "score", "keep", "vec", "f16", "ragged", "note"]  # the row's order, ids left out
    # fields[name][i] belongs to sample i, as lengths[i] does: label = 10 * length + i
    assert f["label"].tolist() == [10 * n + i for i, n in enumerate(batch.lengths.tolist())] == [30, 51, 22, 53, 44]
    assert f["label"].dtype == torch.int64
    assert f["id"] == ["row-0", "row-1", "row-2", "row-3", "row-4"]
    assert f["score"].dtype == torch.float32 and f["score"].tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f["keep"].dtype == torch.bool and f["keep"].tolist() == [True, False, True, False, True]
    assert f["vec"].dtype == torch.int32 and f["vec"].tolist() == [[i, -i] for i in range(5)]
    assert f["f16"].dtype == torch.float16 and f["f16"].tolist() == [0, 1, 2, 3, 4]
    assert f["ragged"] == [[], [0], [0, 1], [0, 1, 2], [0, 1, 2, 3]]  # ragged: the list, as given
    assert f["note"] == ["x", "x", None, "x", "x"]
    # tags are not in pack_fields here: per-row values, ragged, so a list
    assert f["tags"] == [r["tags"] for r in rows]


def test_fields_line_up_with_a_recurrent_layers_final_state():
    """h_n of a packed batch is in the caller's order: h_n[:, i] is sample i's, as fields[...][i] is."""
    torch.manual_seed(0)
    rows = make_rows([4, 7, 2, 7, 5, 1])
    batch = PackedCollator(shift=False)(rows)
    emb, gru = torch.nn.Embedding(700, 8), torch.nn.GRU(8, 6, bidirectional=True)
    x = batch.inputs
    _, h_n = gru(PackedSequence(emb(x.data), x.batch_sizes, x.sorted_indices, x.unsorted_indices))  # (2, B, 6)
    for i, label in enumerate(batch.fields["label"].tolist()):
        r = rows[label % 10]  # the row this label names
        _, alone = gru(emb(torch.tensor(r["input_ids"]))[:, None])  # (2, 1, 6): the row on its own
        torch.testing.assert_close(h_n[:, i], alone[:, 0])
        assert r is rows[i] and batch.fields["id"][i] == f"row-{i}"


def test_rows_without_other_fields_and_non_rows_give_no_fields():
    assert PackedCollator()([{"input_ids": [1, 2]}, {"input_ids": [3, 4, 5]}]).fields == {}
    assert PackedCollator()([[1, 2], [3, 4, 5]]).fields == {}
    assert PadCollator()([np.array([1, 2]), np.array([3, 4, 5])]).fields == {}
    plain = PackedCollator(shift=False)([[1, 2]])
    rebuilt = PackedBatch(plain.inputs, plain.targets, plain.lengths, plain.indices)  # positional, as lm/ builds it
    assert rebuilt.fields == {} and rebuilt.pad_id == 0


# ---------------------------------------------------------- token-level fields


LENGTH_SETS = {
    "one run": [4, 4, 4, 4],
    "two runs": [3, 6, 3, 6, 3],
    "four runs": [3, 5, 3, 9, 4, 4, 9, 5],
    "gather": [9, 8, 7, 6, 5, 4, 3, 2],
}


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("lengths", LENGTH_SETS.values(), ids=LENGTH_SETS.keys())
def test_packed_token_field_is_packed_exactly_like_the_ids(lengths, shift):
    rows = make_rows(lengths)
    batch = PackedCollator(shift=shift, pack_fields=["tags"])(rows)
    tags = batch.fields["tags"]
    assert isinstance(tags, PackedSequence) and tags.data.dtype == torch.int64
    # the very same index objects: one packing, shared
    assert tags.batch_sizes is batch.inputs.batch_sizes
    assert tags.sorted_indices is batch.inputs.sorted_indices and tags.unsorted_indices is batch.inputs.unsorted_indices
    # position by position: tag k belongs to token k (tags are ids mod 7)
    assert torch.equal(tags.data, batch.inputs.data % 7)
    # with shift, cut like the inputs: field[:-1]; unpacks to the caller's order
    unpacked, lens = pad_packed_sequence(tags, batch_first=True, padding_value=-1)
    assert torch.equal(unpacked, padded(rows, "tags", max(lengths) - shift, shift, -1))
    assert torch.equal(lens, batch.lengths)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.lists(st.tuples(st.integers(1, 500), st.integers(-3, 3)), min_size=2, max_size=12), min_size=1, max_size=9
    ),
    shift=st.booleans(),
)
def test_token_fields_of_any_batch_unpack_to_the_callers_rows(data, shift):
    """Random ids with independent random tags: packed tags unpack to each row's tags
    (cut like the inputs), and PadCollator's padded tags equal them."""
    rows = [{"input_ids": [i for i, _ in r], "tags": [t for _, t in r], "n": k} for k, r in enumerate(data)]
    batch = PackedCollator(shift=shift, pack_fields=("tags",))(rows)
    T = max(map(len, data)) - shift
    want = padded(rows, "tags", T, shift, -100)
    got, _ = pad_packed_sequence(batch.fields["tags"], batch_first=True, padding_value=-100)
    assert torch.equal(got, want)
    assert batch.fields["n"].tolist() == list(range(len(rows)))
    pad = PadCollator(shift=shift, pad_fields=("tags",))(rows)
    assert torch.equal(pad.fields["tags"], want)
    assert torch.equal(pad.fields["tags"] != -100, pad.mask)  # tags are -3..3: -100 exactly past each length


def test_token_field_dtypes():
    rows = [
        {"input_ids": [1, 2, 3], "w": [0.5, 1.0, 2.0], "m": np.array([1, 0, 1], dtype=bool),
         "u8": np.array([1, 2, 3], dtype=np.uint8), "f64": np.array([0.1, 0.2, 0.3]), "t": torch.tensor([7, 8, 9])},
        {"input_ids": [4, 5], "w": [3.0, 4.0], "m": np.array([0, 1], dtype=bool),
         "u8": np.array([4, 5], dtype=np.uint8), "f64": np.array([0.4, 0.5]), "t": torch.tensor([1, 2])},
    ]
    names = ["w", "m", "u8", "f64", "t"]
    f = PackedCollator(shift=False, pack_fields=names)(rows).fields
    assert {n: f[n].data.dtype for n in names} == {
        "w": torch.float32, "m": torch.bool, "u8": torch.int64, "f64": torch.float64, "t": torch.int64}
    assert f["w"].data.tolist() == [0.5, 3.0, 1.0, 4.0, 2.0]
    assert f["u8"].data.tolist() == [1, 4, 2, 5, 3] and f["t"].data.tolist() == [7, 1, 8, 2, 9]
    p = PadCollator(shift=False, pad_fields=names, field_pad_value={"m": False, "w": 0.0})(rows).fields
    assert p["m"].tolist() == [[True, False, True], [False, True, False]]
    assert p["w"].tolist() == [[0.5, 1.0, 2.0], [3.0, 4.0, 0.0]] and p["w"].dtype == torch.float32
    assert p["u8"].tolist() == [[1, 2, 3], [4, 5, -100]] and p["u8"].dtype == torch.int64  # -100 fits int64


def test_python_floats_follow_torchs_default_dtype():
    rows = [{"input_ids": [1, 2], "score": 0.5, "w": [0.25, 1.0]}, {"input_ids": [3], "score": 2.0, "w": [4.0]}]
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        f = PackedCollator(shift=False, pack_fields=["w"])(rows).fields
    finally:
        torch.set_default_dtype(before)
    assert f["score"].dtype == f["w"].data.dtype == torch.float64
    assert f["score"].tolist() == [0.5, 2.0] and f["w"].data.tolist() == [0.25, 4.0, 1.0]


def test_pad_collator_fields_exact():
    rows = make_rows([3, 6])
    out = PadCollator(shift=True, pad_to_multiple_of=4, pad_fields=["tags"])(rows)
    assert isinstance(out, PaddedBatch)
    assert out.inputs.tolist() == [[1, 2, 0, 0, 0, 0, 0, 0], [101, 102, 103, 104, 105, 0, 0, 0]]
    # cut like the inputs: tags of ids 1, 2 and 101..105 (mod 7); -100 past each length
    assert out.fields["tags"].tolist() == [[1, 2, -100, -100, -100, -100, -100, -100], [3, 4, 5, 6, 0, -100, -100, -100]]
    assert out.fields["label"].tolist() == [30, 61] and out.fields["id"] == ["row-0", "row-1"]
    zero = PadCollator(shift=False, pad_fields=["tags"], field_pad_value=0)(rows)
    assert zero.fields["tags"].tolist() == [[1, 2, 3, 0, 0, 0], [3, 4, 5, 6, 0, 1]]


# ------------------------------------------------------------------- errors


def test_token_field_of_another_length_names_the_row_and_the_field():
    rows = make_rows([3, 4, 2])
    rows[1]["tags"] = rows[1]["tags"][:-1]
    for collate in (PackedCollator(shift=True, pack_fields=["tags"]), PadCollator(shift=True, pad_fields=["tags"])):
        with pytest.raises(ValueError, match=r"batch position 1: token-level field 'tags' has 3 values but 'input_ids' has 4 ids"):
            collate(rows)
    rows[1]["tags"] = 5
    with pytest.raises(ValueError, match=r"batch position 1: token-level field 'tags' has a single value but 'input_ids' has 4"):
        PackedCollator(pack_fields=["tags"])(rows)


@pytest.mark.parametrize(
    "rows, kwargs, error, match",
    [
        ([{"input_ids": [1, 2], "label": 1}, {"input_ids": [3, 4]}], {},
         ValueError, r"batch position 1 has no field\(s\) \['label'\], which batch position 0 has"),
        ([{"input_ids": [1, 2]}, {"input_ids": [3, 4], "label": 0}], {},
         ValueError, r"batch position 1 has field\(s\) \['label'\] that batch position 0 lacks"),
        ([{"input_ids": [1, 2], "a": 1}, {"input_ids": [3, 4], "b": 0}], {},
         ValueError, r"batch position 1 has no field\(s\) \['a'\]"),
        ([[1, 2], [3, 4]], {"pack_fields": ["tags"]}, ValueError, r"pack_fields=\('tags',\) needs dict rows"),
        ([{"input_ids": [1, 2], "tag": [0, 1]}], {"pack_fields": ["tags"]},
         ValueError, r"pack_fields names \['tags'\], which the rows do not have \(their fields: \['tag'\]\)"),
        ([{"input_ids": [1, 2], "tags": ["B", "I"]}], {"pack_fields": ["tags"]}, TypeError, r"'tags' must hold numbers"),
        ([{"input_ids": [1, 2], "tags": [[1, 2], [3, 4]]}], {"pack_fields": ["tags"]}, ValueError, r"one number per id"),
    ],
)
def test_field_errors(rows, kwargs, error, match):
    with pytest.raises(error, match=match):
        PackedCollator(shift=False, **kwargs)(rows)


def test_bad_options():
    with pytest.raises(ValueError, match="pack_fields names 'input_ids', the ids themselves"):
        PackedCollator(pack_fields=["input_ids"])
    with pytest.raises(ValueError, match=r"field_pad_value names \['x'\], which are not in pad_fields"):
        PadCollator(pad_fields=["tags"], field_pad_value={"x": 0})
    with pytest.raises(ValueError, match=r"field_pad_value=-100 does not fit pad field 'm' of dtype bool"):
        PadCollator(shift=False, pad_fields=["m"])([{"input_ids": [1, 2], "m": [True, False]}])
    assert PackedCollator(pack_fields="tags").pack_fields == ("tags",)  # one name, not its letters
    assert "pack_fields=('tags',)" in repr(PackedCollator(pack_fields="tags"))


# ------------------------------------------------------------ batch methods


def _batches_with_fields():
    rows = make_rows([3, 5, 2])
    return [PackedCollator(shift=True, pack_fields=["tags"])(rows), PadCollator(shift=True, pad_fields=["tags"])(rows)]


@pytest.mark.parametrize("batch", _batches_with_fields(), ids=["packed", "padded"])
def test_to_moves_fields_and_pin_memory_pins_them(batch, monkeypatch):
    moved = batch.to("cpu", non_blocking=True)
    assert moved.fields.keys() == batch.fields.keys()
    assert moved.fields["id"] is batch.fields["id"]  # a list stays as it is
    assert torch.equal(moved.fields["label"], batch.fields["label"])
    tags = moved.fields["tags"]
    assert torch.equal(tags.data if isinstance(tags, PackedSequence) else tags,
                       batch.fields["tags"].data if isinstance(tags, PackedSequence) else batch.fields["tags"])

    monkeypatch.setattr("pipeline.collate._accelerator_available", lambda: False)
    assert batch.pin_memory() is batch  # nothing to pin for: the batch as is

    pinned = set()

    def fake_pin(t: torch.Tensor) -> torch.Tensor:
        copy = t.clone()
        pinned.add(id(copy))
        return copy

    monkeypatch.setattr("pipeline.collate._accelerator_available", lambda: True)
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    out = batch.pin_memory()
    assert id(out.fields["label"]) in pinned and torch.equal(out.fields["label"], batch.fields["label"])
    t = out.fields["tags"]
    assert id(t.data if isinstance(t, PackedSequence) else t) in pinned
    assert out.fields["id"] is batch.fields["id"]


@pytest.mark.cuda
@pytest.mark.parametrize("batch", _batches_with_fields(), ids=["packed", "padded"])
def test_fields_pinned_and_moved_to_cuda(batch):
    out = batch.pin_memory()
    moved = out.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    for name in ("label", "tags"):
        pinned, there = out.fields[name], moved.fields[name]
        assert pinned.is_pinned() and there.is_cuda, name
        if isinstance(there, PackedSequence):
            assert torch.equal(there.data.cpu(), batch.fields[name].data)
            assert there.batch_sizes is pinned.batch_sizes  # stays on the CPU, as the inputs' do
        else:
            assert torch.equal(there.cpu(), batch.fields[name])
    assert moved.fields["id"] is batch.fields["id"]


# ------------------------------------------------- loaders, samplers, streams


def _check_aligned(batch: PackedBatch, by_id: dict[str, dict], shift: bool) -> list[str]:
    """Every field of ``batch`` against the source row its ``id`` names; returns the ids."""
    ids, _, _ = batch.padded()  # (B, T) caller's order
    tags, _ = pad_packed_sequence(batch.fields["tags"], batch_first=True, padding_value=-1)
    for i, name in enumerate(batch.fields["id"]):
        row = by_id[name]
        n = len(row["input_ids"]) - shift
        assert batch.lengths[i] == n
        assert ids[i, :n].tolist() == list(row["input_ids"][:n])
        assert tags[i, :n].tolist() == list(row["tags"][:n])
        assert int(batch.fields["label"][i]) == row["label"]
    return list(batch.fields["id"])


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_dataloader_workers_keep_every_field_aligned():
    rng = np.random.default_rng(1)
    rows = make_rows(rng.integers(2, 30, 60).tolist())
    by_id = {r["id"]: r for r in rows}
    perm = rng.permutation(len(rows)).tolist()
    batches = [perm[i : i + 7] for i in range(0, len(perm), 7)]  # caller order unsorted: the collator sorts
    loader = DataLoader(rows, batch_sampler=batches, collate_fn=PackedCollator(shift=True, pack_fields=["tags"]),
                        num_workers=2, pin_memory=True)
    seen = []
    for batch, want in zip(loader, batches):
        assert batch.fields["id"] == [f"row-{i}" for i in want]
        seen += _check_aligned(batch, by_id, shift=True)
    assert sorted(seen) == sorted(by_id) and len(seen) == 60


def test_bucket_sampler_over_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(2)
    rows = make_rows(rng.integers(1, 25, 80).tolist())
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "label", "id", "tags")})
    sampler = BucketBatchSampler([len(r["input_ids"]) for r in rows], max_tokens=60, seed=3)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=PackedCollator(shift=False, pack_fields=["tags"]))
    by_id = {r["id"]: r for r in rows}
    seen = [i for batch in loader for i in _check_aligned(batch, by_id, shift=False)]
    assert sorted(seen) == sorted(by_id)
    # the numpy format (README's form): arrays for ids, the other columns as they are
    npds = ds.with_format("numpy", columns=["input_ids", "tags"], output_all_columns=True)
    batch = PadCollator(shift=False, pad_fields=["tags"])([npds[i] for i in (4, 0, 9)])
    assert batch.fields["id"] == ["row-4", "row-0", "row-9"] and batch.fields["label"].tolist() == [rows[i]["label"] for i in (4, 0, 9)]
    assert torch.equal(batch.fields["tags"] != -100, batch.mask)


def test_stream_batcher_over_rows_with_several_fields():
    rng = np.random.default_rng(3)
    rows = make_rows(rng.integers(2, 40, 300).tolist())
    by_id = {r["id"]: r for r in rows}
    batcher = StreamBucketBatcher(rows, max_tokens=120, buffer_size=50, bin_sample=30, seed=1)
    loader = DataLoader(batcher, batch_size=None, num_workers=2,
                        collate_fn=PackedCollator(shift=True, pack_fields=["tags"]))
    seen = [i for batch in loader for i in _check_aligned(batch, by_id, shift=True)]
    assert sorted(seen) == sorted(by_id)  # every row once, across both workers' shards
