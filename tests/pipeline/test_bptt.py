"""Stream mode's windows: the stream's exact ids, exact token counts, state-carrying order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.bptt import StreamWindows
from pipeline.collate import PackedCollator
from pipeline.data import TokenDataset

LINES = ["a b c", "d e", "f g h i", "j", "k l m n o"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipeline.config import DataConfig
    from pipeline.typed_yaml import from_dict
    from pipeline.prepare import prepare

    root = tmp_path_factory.mktemp("bptt")
    (root / "src").mkdir()
    for name in ("train", "valid"):
        (root / "src" / f"{name}.txt").write_text("\n".join(LINES) + "\n")
    cfg = from_dict(DataConfig, {"source": {"dir": "src"}, "output": "out", "tokenizer": {"kind": "word"}}, "data", root)
    prepare(cfg, quiet=True)
    return root / "out"


def _stream(ds: TokenDataset) -> np.ndarray:
    """The reference: first row's <bos>, then every row without its first id."""
    return np.concatenate([ds[0][:1]] + [ds[i][1:] for i in range(len(ds))]).astype(np.int64)


def test_stream_is_lines_with_eos_and_one_leading_bos(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train")
    w = StreamWindows(ds, 1, 1000)
    (only,) = w.window(0)
    assert only.tolist() == _stream(ds).tolist()
    assert only[0] == 1 and (only == 2).sum() == len(LINES)  # <bos> once, <eos> per line
    assert (only == 1).sum() == 1
    assert w.num_predicted == sum(len(line.split()) + 1 for line in LINES) == len(only) - 1 == ds.num_tokens


@pytest.mark.parametrize("streams,bptt", [(1, 3), (2, 3), (3, 4), (4, 1), (7, 2)])
def test_exact_windows_predict_every_position_once_in_order(prepared: Path, streams: int, bptt: int) -> None:
    ds = TokenDataset(prepared, "train")
    ref = _stream(ds)
    w = StreamWindows(ds, streams, bptt, exact=True)
    per_stream: list[list[int]] = [[] for _ in range(streams)]
    active_prev = streams
    for window in w:
        assert 1 <= len(window) <= active_prev  # streams only drop off the end
        active_prev = len(window)
        for b, ids in enumerate(window):
            assert 2 <= len(ids) <= bptt + 1
            if per_stream[b]:
                assert per_stream[b][-1] == ids[0]  # windows overlap by one id (the carried input)
                per_stream[b].extend(ids[1:].tolist())
            else:
                per_stream[b].extend(ids.tolist())
    # the streams, each minus its first (input-only) id, tile the predicted positions exactly
    predicted = [t for s in per_stream for t in s[1:]]
    assert predicted == ref[1:].tolist()
    assert sum(len(s) - 1 for s in per_stream) == ds.num_tokens


def test_training_windows_are_full_and_trim_the_remainder(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train")
    n = ds.num_tokens  # 20
    w = StreamWindows(ds, 3, 2, exact=False)
    windows = list(w)
    per = n // 3
    assert len(windows) == -(-per // 2)
    assert all(len(win) == 3 for win in windows)
    assert sum(len(ids) - 1 for win in windows for ids in win) == 3 * per
    batch = PackedCollator()(windows[0])
    assert batch.num_tokens == 6 and batch.targets.data.numel() == 6


def test_ranks_take_contiguous_blocks_and_equal_steps(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train")
    whole = [np.concatenate([ids[1:] for ids in col]) for col in zip(*StreamWindows(ds, 4, 2, exact=False))]
    r0, r1 = (StreamWindows(ds, 4, 2, exact=False, num_replicas=2, rank=r) for r in (0, 1))
    assert len(r0) == len(r1)
    got = [np.concatenate([ids[1:] for ids in col]) for col in zip(*r0)] + \
          [np.concatenate([ids[1:] for ids in col]) for col in zip(*r1)]
    assert [g.tolist() for g in got] == [g.tolist() for g in whole]
    with pytest.raises(ValueError, match="multiple"):
        StreamWindows(ds, 3, 2, num_replicas=2)


def test_variable_bptt_plan_is_seeded_and_resumable(prepared: Path) -> None:
    ds = TokenDataset(prepared, "train")
    a = StreamWindows(ds, 1, 6, exact=False, variable=True, seed=3)
    b = StreamWindows(ds, 1, 6, exact=False, variable=True, seed=3)
    assert np.array_equal(a._plan, b._plan) and a._plan[-1] == ds.num_tokens
    assert all(a.window_length(i) >= 5 or i == len(a) - 1 for i in range(len(a)))
    it = iter(a)
    first = next(it)
    state = a.state_dict()
    rest = list(it)
    b.load_state_dict(state)
    assert [[x.tolist() for x in win] for win in b] == [[x.tolist() for x in win] for win in rest]
    b.set_epoch(1)
    assert b.position == 0 and not np.array_equal(b._plan, a._plan) and b._plan[-1] == ds.num_tokens
    assert len(list(a)) == len(a)  # a new pass, not a resumed one, starts at the beginning
    assert first[0][0] == 1


def test_too_many_streams_is_an_error(prepared: Path) -> None:
    with pytest.raises(ValueError, match="fewer than"):
        StreamWindows(TokenDataset(prepared, "train"), 100, 2)
