"""pipeline.streaming: every row exactly once per pass across workers and ranks, budgets,
bounded buffer, seeded draws, exact mid-stream resume, Hugging Face streaming datasets,
and encoded streamed splits equal to what pipeline.prepare writes."""
from __future__ import annotations

import gc
import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline import PackedCollator, StreamBucketBatcher
from pipeline.data import TokenDataset

N = 1200


def make_rows(n: int = N, seed: int = 0, longest: int = 60) -> list[list[int]]:
    """Row i holds ids i*1000, i*1000+1, ...: its first id names it."""
    rng = random.Random(seed)
    return [list(range(i * 1000, i * 1000 + rng.randint(1, longest))) for i in range(n)]


def names(batches) -> list[int]:
    return [int(r["input_ids"][0] if isinstance(r, dict) else r[0]) // 1000 for b in batches for r in b]


def efficiency(batches) -> float:
    return sum(len(r) for b in batches for r in b) / sum(len(b) * max(len(r) for r in b) for b in batches)


def test_every_row_once_from_a_generator_function_with_budgets():
    rows = make_rows()
    b = StreamBucketBatcher(lambda: (r for r in rows), max_tokens=200, batch_size=16, buffer_size=300, seed=3)
    batches = list(b)
    assert sorted(names(batches)) == list(range(N))
    assert all(sum(len(r) for r in x) <= 200 and len(x) <= 16 for x in batches)
    assert all([len(r) for r in x] == sorted((len(r) for r in x), reverse=True) for x in batches)  # longest first
    assert efficiency(batches) > 0.95


def test_padded_cost_and_batch_size_only():
    rows = make_rows()
    padded = list(StreamBucketBatcher(rows, max_tokens=240, cost="padded", buffer_size=256))
    assert sorted(names(padded)) == list(range(N))
    assert all(len(x) * max(len(r) for r in x) <= 240 for x in padded)
    fixed = list(StreamBucketBatcher(rows, batch_size=32, buffer_size=256))
    assert sorted(names(fixed)) == list(range(N))
    assert all(len(x) <= 32 for x in fixed) and sum(len(x) == 32 for x in fixed) >= N // 32 - 2 * 32  # mostly full


def test_too_long_row_and_bad_options_raise():
    with pytest.raises(ValueError, match="stream item 1 has 9 tokens"):
        list(StreamBucketBatcher([[1], [1] * 9], max_tokens=8))
    with pytest.raises(KeyError, match="stream item 1 has no field 'input_ids' .its fields: ids."):
        list(StreamBucketBatcher([{"input_ids": [1]}, {"ids": [1, 2]}], batch_size=2))
    with pytest.raises(ValueError, match="batch_size, max_tokens"):
        StreamBucketBatcher([[1]])
    with pytest.raises(ValueError, match="ascending"):
        StreamBucketBatcher([[1]], batch_size=2, bins=[5, 3])


def test_buffer_is_bounded():
    rows = make_rows()
    b = StreamBucketBatcher(rows, batch_size=8, buffer_size=100, bin_sample=50)
    most = 0
    for _ in b:
        p = b._live
        if not p.done:
            most = max(most, p.held)
    # a batch (<= 8 rows) leaves as soon as buffer_size rows are held: seen between batches, 92..99 remain
    assert 92 <= most <= 99


def test_seeded_draws_new_each_epoch_and_given_bins():
    rows = make_rows()
    a, b = StreamBucketBatcher(rows, batch_size=8, seed=1, buffer_size=200), StreamBucketBatcher(rows, batch_size=8, seed=1, buffer_size=200)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(b) != list(a)
    fixed = StreamBucketBatcher(rows, batch_size=8, bins=[10, 20, 40], buffer_size=200)
    out = list(fixed)
    assert sorted(names(out)) == list(range(N))
    bins = [min(np.searchsorted([10, 20, 40], len(r)), 2) for r in rows]
    assert all(len({bins[n] for n in names([x])}) == 1 for x in out)  # a batch never mixes bins


def test_unshuffled_is_deterministic_across_seeds():
    rows = make_rows()
    a = list(StreamBucketBatcher(rows, batch_size=8, shuffle=False, seed=1, buffer_size=100))
    b = list(StreamBucketBatcher(rows, batch_size=8, shuffle=False, seed=2, buffer_size=100))
    assert a == b and sorted(names(a)) == list(range(N))


@pytest.mark.parametrize("replicas", [1, 3])
def test_each_row_once_across_ranks_and_workers(replicas):
    rows = make_rows()
    seen = []
    for rank in range(replicas):
        b = StreamBucketBatcher(rows, max_tokens=300, buffer_size=128, num_replicas=replicas, rank=rank, seed=5)
        seen += names(DataLoader(b, batch_size=None, num_workers=2, collate_fn=list))
    assert sorted(seen) == list(range(N))


def test_collators_take_the_batches():
    rows = [{"input_ids": np.array(r + [0], dtype=np.int64)} for r in make_rows(100)]  # >= 2 ids: input and target
    loader = DataLoader(StreamBucketBatcher(rows, max_tokens=128, buffer_size=50), batch_size=None, collate_fn=PackedCollator())
    assert sum(int(b.num_tokens) for b in loader) == sum(len(r["input_ids"]) - 1 for r in rows)


def _tail_batches(b: StreamBucketBatcher):
    for batch in b:
        if b._live.done:
            yield batch


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("stop", [0, 1, 5, 60, -10, -1])
def test_resume_mid_stream_is_exact(stop):
    rows = make_rows()
    make = lambda: StreamBucketBatcher(lambda: iter(rows), batch_size=8, buffer_size=200, bin_sample=300, seed=7)  # noqa: E731
    full = list(make())
    tail = len(list(_tail_batches(make())))
    assert tail > 10  # negative stops land in the end-of-stream batches
    stop = stop % len(full)
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(stop)]
    state = _roundtrip(first.state_dict())
    second = make()
    second.load_state_dict(state)
    assert head + list(second) == full


def test_resume_with_other_options_refused():
    a = StreamBucketBatcher([[1]], batch_size=8)
    with pytest.raises(ValueError, match="batch_size: saved 8, now 4"):
        StreamBucketBatcher([[1]], batch_size=4).load_state_dict(a.state_dict())


def test_state_before_the_first_batch_keeps_given_bins():
    rows = make_rows()
    make = lambda: StreamBucketBatcher(rows, batch_size=8, bins=[5, 30], buffer_size=100, bin_sample=7, seed=4)  # noqa: E731
    first = make()
    iter(first)  # a pass made, no batch drawn yet
    second = make()
    second.load_state_dict(_roundtrip(first.state_dict()))
    assert list(second) == list(make())  # the given bins, not bins estimated from 7 rows


def test_rows_come_back_in_their_form():
    """Lists and one-field dict rows are held flat and come back equal; other rows are the same objects."""
    rng = random.Random(2)
    rows = []
    for i in range(600):
        ids = list(range(i * 1000, i * 1000 + rng.randint(0, 12)))  # empty rows too
        rows.append([ids, {"input_ids": ids}, tuple(ids), np.array(ids, dtype=np.int64), {"input_ids": ids, "i": i}][i % 5])
    ids_of = lambda r: r["input_ids"] if isinstance(r, dict) else r  # noqa: E731
    for kw in ({"batch_size": 7}, {"max_tokens": 40}, {"max_tokens": 40, "cost": "padded"}):
        out = [r for batch in StreamBucketBatcher(rows, buffer_size=50, bin_sample=20, **kw) for r in batch]
        assert len(out) == len(rows)
        for r in out:
            if not len(ids_of(r)):  # an empty row names no row: counted below
                continue
            src = rows[int(ids_of(r)[0]) // 1000]
            assert type(r) is type(src)
            if isinstance(src, (np.ndarray, tuple)) or (isinstance(src, dict) and len(src) == 2):
                assert r is src
            else:
                assert r == src and r is not src
        kinds = lambda rs: sorted(type(r).__name__ + str(len(r) if isinstance(r, dict) else "") for r in rs if not len(ids_of(r)))  # noqa: E731
        assert kinds(out) == kinds(rows)


def test_held_rows_are_nothing_for_the_garbage_collector_to_track():
    """5,000 buffered dict rows add a few group lists to the tracked objects, not a dict and a list each."""
    def rows():  # fresh rows, held by nobody but the batcher
        rng = random.Random(3)
        for i in range(5000):
            yield {"input_ids": [i] * rng.randint(1, 60)}

    list(StreamBucketBatcher(rows, batch_size=8, buffer_size=100, bin_sample=100))  # first uses (imports, caches) done
    b = StreamBucketBatcher(rows, batch_size=8, buffer_size=10_000, bin_sample=100)
    gc.collect()
    before = len(gc.get_objects())
    it = iter(b)
    first = next(it)  # the stream has ended: all 5,000 rows held, the tail's batches planned, not made
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert b._live.done and 5000 - len(first) == sum(hi - lo for _, lo, hi in b._live.tail)
    assert grown < 400, grown  # ~60 lengths x (group, its flat lists); a dict and a list per row would be 10,000
    assert sorted(r["input_ids"][0] for batch in [first, *it] for r in batch) == list(range(5000))


@pytest.mark.parametrize("cost", ["unpadded", "padded"])
def test_a_batch_is_the_budgeted_run_of_the_sorted_bin(cost):
    """The cut walks groups of equal length, k rows at a time; it must give what a row-by-row
    walk of the bin sorted by length gives: up from the start while the budget holds, then down."""
    from pipeline.streaming import _Pass

    def walk(lengths, start, bs, mt, below):  # the definition, row by row
        cap, hi, total, longest = bs or len(lengths), start, 0, 0
        cost_of = (lambda rows, total, top: rows * top) if cost == "padded" else (lambda rows, total, top: total)
        while hi < len(lengths) and hi - start < cap and cost_of(hi - start + 1, total + lengths[hi], lengths[hi]) <= mt:
            total, longest, hi = total + lengths[hi], lengths[hi], hi + 1
        lo = start
        while below and lo > 0 and hi - lo < cap and cost_of(hi - lo + 1, total + lengths[lo - 1], longest) <= mt:
            total, lo = total + lengths[lo - 1], lo - 1
        return lo, hi

    rng = random.Random(4)
    for _ in range(200):
        lengths = [rng.choice([0, rng.randint(1, 40)]) if rng.random() < 0.1 else rng.randint(1, 40) for _ in range(rng.randint(1, 70))]
        bs, mt = rng.choice([None, 1, 4, 64]), rng.choice([40, 97, 1000])
        b = StreamBucketBatcher([], batch_size=bs, max_tokens=mt, cost=cost, bins=[40])
        p = _Pass(b, 1, 0, None)
        for n in lengths:
            p._add(n, [0] * n)
        for start in range(len(lengths)):
            for below in (True, False):
                assert p._run_of(0, start, below) == walk(sorted(lengths), start, bs, mt, below), (lengths, bs, mt, start, below)


@pytest.fixture
def text_stream(tmp_path: Path):
    """A text file streamed by datasets, each line's words hashed to ids: row i names line i."""
    import datasets

    rng = random.Random(1)
    lines = [" ".join(["w"] * rng.randint(0, 40)) for _ in range(700)]
    path = tmp_path / "train.txt"
    path.write_text("".join(f"{i} {line}\n" for i, line in enumerate(lines)))
    ds = datasets.load_dataset("text", data_files={"train": str(path)}, split="train", streaming=True)
    enc = ds.map(lambda b: {"input_ids": [[int(t.split()[0]) * 1000] + [1] * (len(t.split()) - 1) for t in b["text"]]},
                 batched=True, batch_size=64, remove_columns=["text"])
    return enc, len(lines)


def test_hf_streaming_dataset_every_row_once_and_resume(text_stream):
    ds, n = text_stream
    make = lambda: StreamBucketBatcher(ds, max_tokens=256, buffer_size=150, bin_sample=100, seed=2)  # noqa: E731
    full = list(make())
    assert sorted(names(full)) == list(range(n))
    first = make()
    it = iter(first)
    head = [next(it) for _ in range(20)]
    state = _roundtrip(first.state_dict())
    assert state["upstream"] is not None  # the dataset's own position, not a re-read
    second = make()
    second.load_state_dict(state)
    assert head + list(second) == full


def test_hf_streaming_dataset_in_workers(text_stream):
    ds, n = text_stream
    seen = names(DataLoader(StreamBucketBatcher(ds, batch_size=16, buffer_size=64), batch_size=None, num_workers=2, collate_fn=list))
    assert sorted(seen) == list(range(n))


def test_stream_splits_rows_equal_prepared_rows(data_cfg, tmp_path):
    from pipeline.prepare import prepare
    from pipeline.streaming import open_stream

    src = tmp_path / "src"
    src.mkdir()
    (src / "train.txt").write_text("the cat sat\n\nthe dog ran far\na cat\n")
    (src / "valid.txt").write_text("the bird\ncat dog\n")
    cfg = data_cfg()
    prepare(cfg, quiet=True)
    splits, tok = open_stream(cfg)
    assert tok.to_str() == type(tok).from_file(str(cfg.output / "tokenizer.json")).to_str()
    for split in ("train", "validation"):
        ds = TokenDataset(cfg.output, split)
        assert [r["input_ids"] for r in splits[split]] == [ds[i].tolist() for i in range(len(ds))]
    capped = data_cfg("data.max_len=3")
    splits, _ = open_stream(capped, tok)
    # ids: cat 4, the 5, a 6, dog 7, far 8, ran 9, sat 10 (count, then bytes); windows overlap by one id
    assert [r["input_ids"] for r in splits["train"]] == [[1, 5, 4], [4, 10, 2], [1, 2], [1, 5, 7], [7, 9, 8], [8, 2], [1, 6, 4], [4, 2]]


def _ddp_worker(rank: int, world: int, init: str, rows: list, out: dict) -> None:
    import torch.distributed as dist

    from pipeline.streaming import until_first_rank_ends

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    b = StreamBucketBatcher(rows, batch_size=4, buffer_size=32, seed=0)  # rank and world from torch.distributed
    mine = list(b)
    b.set_epoch(0)
    together = list(until_first_rank_ends(b))
    dist.barrier()
    out[rank] = (b.rank, len(mine), len(together), names(mine))
    dist.destroy_process_group()


def test_ddp_shards_and_uneven_end_does_not_hang(tmp_path):
    import torch.multiprocessing as mp

    rows = make_rows(203, longest=30)  # 203 rows: the two ranks get different batch counts
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'rdv'}", rows, out), nprocs=2, join=True)
        res = dict(out)
    assert [res[r][0] for r in (0, 1)] == [0, 1]
    assert sorted(res[0][3] + res[1][3]) == list(range(203))  # every row once across ranks
    counts = [res[r][1] for r in (0, 1)]
    assert counts[0] != counts[1]  # uneven: the case that would hang
    assert res[0][2] == res[1][2] == min(counts)  # both stopped at the first rank's end


def test_trains_a_model_from_a_streamed_source(data_cfg, tmp_path):
    """The lm.train integration in small: open_stream → batcher → PackedCollator → RNNLM, resumed."""
    from lm.config import ModelConfig
    from lm.model import build_model
    from pipeline.streaming import open_stream

    src = tmp_path / "src"
    src.mkdir()
    words = "the cat sat on the mat while the dog ran".split()
    rng = random.Random(0)
    # prefixes of one sentence: learnable, so the loss must fall far
    (src / "train.txt").write_text("".join(" ".join(words[: rng.randint(3, 10)]) + "\n" for _ in range(300)))
    (src / "valid.txt").write_text("the cat sat on the mat\n")
    cfg = data_cfg("data.stream.enabled=true", "data.stream.sample_lines=100")
    splits, tok = open_stream(cfg, sample_lines=cfg.stream.sample_lines)
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=16, hidden_size=16, num_layers=1, dropout_emb=0, dropout_rnn=0, dropout_out=0),
                        tok.get_vocab_size())
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    batcher = StreamBucketBatcher(splits["train"], max_tokens=256, buffer_size=64, seed=0)
    loader = DataLoader(batcher, batch_size=None, collate_fn=PackedCollator(pad_id=0))
    losses, tokens = [], 0
    for epoch in range(3):
        batcher.set_epoch(epoch)
        for batch in loader:
            out = model(batch, need_state=False, need_logits=False)
            loss = out.nll_sum / batch.num_tokens
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            tokens += int(batch.num_tokens)
        if epoch == 0:
            state = batcher.state_dict()  # after the pass: its end
    n_predicted = sum(len(r["input_ids"]) - 1 for r in splits["train"])
    assert tokens == 3 * n_predicted  # every predicted token once per epoch
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0  # it learns
    assert state["done"] and state["epoch"] == 0 and not state["buffer"] and not state["tail"]
    again = StreamBucketBatcher(splits["train"], max_tokens=256, buffer_size=64, seed=0)
    again.load_state_dict(state)
    assert list(again) == []  # resuming after the last batch does not replay the epoch
