"""TokenDataset: exact rows over a prepared folder, zero-copy views of the memory map,
several record batches and shard files, pickling by path, DataLoader workers (fork, spawn)."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from pipeline.data import TokenDataset, read_manifest
from pipeline.errors import UserError

BOS, EOS = 1, 2
N = 2_500  # more than datasets' 1,000-row writer batches: the split spans 3 record batches


DIGITS = [d for d in range(7) for _ in range(7 - d)]  # 0 seven times, 1 six times, ... 6 once


def _line(i: int) -> str:
    return f"a b {DIGITS[i % len(DIGITS)]}" if i % 5 else ""  # every 5th line empty


def _row(i: int) -> list[int]:
    """The ids prepare gives ``_line(i)``: by frequency a → 4, b → 5, digit d → 6 + d."""
    return [BOS, 4, 5, 6 + DIGITS[i % len(DIGITS)], EOS] if i % 5 else [BOS, EOS]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from pipeline.config import load_data_config
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    (root / "src").mkdir()
    (root / "src" / "train.txt").write_text("".join(f"{_line(i)}\n" for i in range(N)))
    (root / "src" / "valid.txt").write_text("b a\n")
    (root / "recipe.yaml").write_text("data:\n  source: {dir: src}\n  output: out\n")
    prepare(load_data_config(root / "recipe.yaml"), quiet=True)
    return root / "out"


def test_rows_lengths_and_tokens_are_exact(prepared):
    ds = TokenDataset(prepared, "train")
    expected = [_row(i) for i in range(N)]
    assert len(ds) == N
    assert [ds[i].tolist() for i in range(N)] == expected
    assert ds.lengths.tolist() == [len(r) for r in expected] and ds.lengths.dtype == np.int64
    assert ds.num_tokens == sum(len(r) - 1 for r in expected) == read_manifest(prepared)["splits"]["train"]["tokens"]
    assert len(ds._values) == 3  # rows 999/1000 and 1999/2000 straddle record batches, checked above
    assert TokenDataset(prepared, "validation")[0].tolist() == [BOS, 5, 4, EOS]


def test_items_are_read_only_views_of_the_memory_map(prepared):
    ds = TokenDataset(prepared, "train")
    for i in (1, 999, 1000, N - 1):
        x = ds[i]
        assert x.dtype == np.uint16 and not x.flags.owndata and not x.flags.writeable
        assert any(np.shares_memory(x, v) for v in ds._values)
        base = x
        while isinstance(base, np.ndarray):
            base = base.base
        assert type(base).__module__.startswith("pyarrow")  # the Arrow buffer, not a copy


def test_indexing(prepared):
    ds = TokenDataset(prepared, "train")
    assert ds[-1].tolist() == _row(N - 1) and ds[-N].tolist() == _row(0)
    assert ds[np.int64(7)].tolist() == _row(7)
    for bad in (N, -N - 1, 10**9):
        with pytest.raises(IndexError, match=f"index {bad} out of range for {N} sequences"):
            ds[bad]


def test_pickling_carries_only_the_path(prepared):
    ds = TokenDataset(prepared, "train")
    blob = pickle.dumps(ds)
    assert len(blob) < 400
    back = pickle.loads(blob)
    assert (back.folder, back.split, len(back)) == (prepared, "train", N)
    assert [back[i].tolist() for i in range(0, N, 97)] == [_row(i) for i in range(0, N, 97)]
    assert np.array_equal(back.lengths, ds.lengths)


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers(prepared, context):
    ds = TokenDataset(prepared, "train")
    n = 40
    subset = torch.utils.data.Subset(ds, range(n))
    loader = torch.utils.data.DataLoader(subset, batch_size=4, num_workers=2, multiprocessing_context=context, collate_fn=list)
    got = [x.tolist() for batch in loader for x in batch]
    assert got == [_row(i) for i in range(n)]


def test_several_shard_files(tmp_path):
    import datasets

    ids = [[BOS, *range(4, 4 + k), EOS] for k in range(10)]
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")), "length": datasets.Value("int32")})
    split = datasets.Dataset.from_dict({"input_ids": ids, "length": [len(r) for r in ids]}, features=features)
    split.save_to_disk(str(tmp_path / "train"), num_shards=3)
    assert len(json.loads((tmp_path / "train" / "state.json").read_text())["_data_files"]) == 3
    ds = TokenDataset(tmp_path, "train")
    assert [ds[i].tolist() for i in range(len(ds))] == ids and ds[3].dtype == np.int32
    assert ds.num_tokens == sum(len(r) - 1 for r in ids)


def test_missing_split_and_folder(prepared, tmp_path):
    with pytest.raises(UserError) as e:
        TokenDataset(prepared, "test")
    assert str(e.value) == f"{prepared} has no 'test' split (has: train, validation)"
    with pytest.raises(UserError) as e:
        TokenDataset(tmp_path / "nope", "train")
    assert str(e.value) == f"{tmp_path / 'nope'} has no 'train' split (has: none)"


def test_read_manifest(prepared, tmp_path):
    assert read_manifest(prepared)["vocab_size"] == 4 + 2 + 7
    with pytest.raises(UserError) as e:
        read_manifest(tmp_path)
    assert str(e.value) == f"{tmp_path} is not a prepared dataset (no manifest.json); run python -m pipeline.prepare first"
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="manifest.json is corrupt"):
        read_manifest(tmp_path)


def test_wikitext2_reads_back(wikitext2, wikitext2_prepared):
    ds = TokenDataset(wikitext2_prepared, "test")
    assert (len(ds), ds.num_tokens) == (4_358, 245_569)
    words = (wikitext2 / "test.txt").read_text(encoding="utf-8").split("\n")[1].split()  # " = Robert Boulter = "
    assert [ds[1][0], ds[1][-1], len(ds[1])] == [BOS, EOS, len(words) + 2]
