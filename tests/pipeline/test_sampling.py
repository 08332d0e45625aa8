"""BucketBatchSampler: exact plans, invariants over many configurations, resume, DataLoader."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from pipeline.sampling import BucketBatchSampler

# Sweep (longest first, ties by index): 3(8) 8(7) 0(5) 9(4) 1(3) 2(3) 5(2) 6(2) 7(2) 4(1)
LENS = [5, 3, 3, 8, 1, 2, 2, 2, 7, 4]


def all_ranks(lengths, num_replicas, **kw) -> list[list[list[int]]]:
    return [BucketBatchSampler(lengths, num_replicas=num_replicas, rank=r, **kw).plan() for r in range(num_replicas)]


# ---------------------------------------------------------------- exact plans


def test_unshuffled_plan_is_the_length_sorted_sweep():
    s = BucketBatchSampler(LENS, batch_size=3, shuffle=False)
    assert s.plan() == [[3, 8, 0], [9, 1, 2], [5, 6, 7], [4]]
    assert len(s) == 4
    assert list(s) == s.plan()


def test_unshuffled_drop_last_drops_the_remainder():
    s = BucketBatchSampler(LENS, batch_size=3, shuffle=False, drop_last=True)
    assert s.plan() == [[3, 8, 0], [9, 1, 2], [5, 6, 7]]
    assert len(s) == 3


def test_shuffled_plans_exact_per_epoch():
    # Pinned values: the plan is a pure function of (lengths, seed, epoch, rank).
    s = BucketBatchSampler(LENS, batch_size=3, seed=0)
    assert s.plan(0) == [[3, 8, 0], [6], [7, 5, 4], [9, 2, 1]]
    assert s.plan(1) == [[6, 5, 4], [1, 2, 7], [3, 8, 0], [9]]
    assert BucketBatchSampler(LENS, batch_size=3, seed=0).plan(1) == s.plan(1)  # pure: a new instance agrees
    d = BucketBatchSampler(LENS, batch_size=3, seed=0, drop_last=True)
    assert d.plan(0) == [[3, 8, 0], [7, 5, 4], [9, 2, 1]]  # the remainder [6] sat in slot 1 in epoch 0 ...
    assert d.plan(1) == [[6, 5, 4], [3, 8, 0], [1, 2, 7]]  # ... and [9] in slot 3 in epoch 1


def test_token_budget_cuts_exact():
    # unpadded: sum of lengths <= 10 -> [8] [7] [5,4] [3,3,2,2] [2,1]
    assert BucketBatchSampler(LENS, max_tokens=10, shuffle=False).plan() == [[3], [8], [0, 9], [1, 2, 5, 6], [7, 4]]
    # padded: rows x longest <= 10 -> [8] [7] [5,4] [3,3,2] [2,2,1]
    s = BucketBatchSampler(LENS, max_tokens=10, cost="padded", shuffle=False)
    assert s.plan() == [[3], [8], [0, 9], [1, 2, 5], [6, 7, 4]]
    # both limits: at most 2 rows as well
    s = BucketBatchSampler(LENS, max_tokens=10, batch_size=2, shuffle=False)
    assert s.plan() == [[3], [8], [0, 9], [1, 2], [5, 6], [7, 4]]


def test_replicas_split_the_largest_batches_and_deal_round_robin():
    # 4 batches for 3 ranks -> split [3,8,0] and then [9,1,2] (most rows, earliest first):
    # [3,8] [0] [9,1] [2] [5,6,7] [4], dealt r, r+3.
    assert all_ranks(LENS, 3, batch_size=3, shuffle=False) == [
        [[3, 8], [2]],
        [[0], [5, 6, 7]],
        [[9, 1], [4]],
    ]
    # drop_last: the remainder [4] goes, then 3 batches deal one each.
    assert all_ranks(LENS, 3, batch_size=3, shuffle=False, drop_last=True) == [[[3, 8, 0]], [[9, 1, 2]], [[5, 6, 7]]]


# ------------------------------------------------------------------ errors


def test_sequence_over_budget_is_a_clear_error():
    with pytest.raises(ValueError, match=r"sequence 3 has 8 tokens, more than max_tokens=7"):
        BucketBatchSampler(LENS, max_tokens=7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lengths=[3, 2], batch_size=1, num_replicas=3), "cannot give 3 replicas the same number of batches"),
        (dict(lengths=[3, 2], batch_size=4, num_replicas=3, drop_last=True), "leaves no batch for 3 replica"),
        (dict(lengths=[3, 0, 2], batch_size=2), "length < 1"),
        (dict(lengths=[], batch_size=2), "empty"),
        (dict(lengths=[1.5, 2.0], batch_size=2), "integers"),
        (dict(lengths=[3, 2]), "batch_size, max_tokens, or both"),
        (dict(lengths=[3, 2], batch_size=2, cost="dense"), "cost must be"),
        (dict(lengths=[3, 2], batch_size=2, num_replicas=2, rank=2), "rank"),
    ],
)
def test_bad_configurations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BucketBatchSampler(kwargs.pop("lengths"), **kwargs)


# -------------------------------------------------------------- invariants


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120),
    limit=st.one_of(
        st.tuples(st.integers(1, 9), st.none()),
        st.tuples(st.none(), st.integers(40, 200)),
        st.tuples(st.integers(1, 9), st.integers(40, 200)),
    ),
    cost=st.sampled_from(["unpadded", "padded"]),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    world=st.integers(1, 8),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
)
def test_invariants(lengths, limit, cost, shuffle, drop_last, world, seed, epoch):
    batch_size, max_tokens = limit
    kw = dict(batch_size=batch_size, max_tokens=max_tokens, cost=cost, shuffle=shuffle, drop_last=drop_last, seed=seed)
    try:
        samplers = [BucketBatchSampler(lengths, num_replicas=world, rank=r, **kw) for r in range(world)]
    except ValueError as e:  # only when equal shares are impossible
        if drop_last:
            assert "leaves no batch" in str(e)
        else:
            assert "cannot give" in str(e)
            # splitting to a multiple of `world` needs at least that many sequences
            nb = len(BucketBatchSampler(lengths, **kw))
            assert len(lengths) < -(-nb // world) * world
        return
    L = np.asarray(lengths)
    plans = []
    for s in samplers:
        s.set_epoch(epoch)
        plan = list(s)
        assert plan == s.plan(epoch)
        assert len(plan) == len(s) >= 1  # every rank the same, exact count
        plans.append(plan)
    seen = [i for plan in plans for b in plan for i in b]
    assert len(seen) == len(set(seen))  # no duplicates, on any rank
    if not drop_last:
        assert sorted(seen) == list(range(len(L)))  # every index exactly once
    for b in (b for plan in plans for b in plan):
        assert b and list(L[b]) == sorted(L[b], reverse=True)  # longest first inside a batch
        if batch_size:
            assert len(b) <= batch_size
        if max_tokens:
            assert (L[b].sum() if cost == "unpadded" else len(b) * L[b].max()) <= max_tokens
    assert len({len(p) for p in plans}) == 1


def test_epochs_differ_and_unshuffled_is_fixed():
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, 500)
    s = BucketBatchSampler(lengths, batch_size=8, seed=3)
    plans = [s.plan(e) for e in range(4)]
    assert all(plans[i] != plans[j] for i in range(4) for j in range(i))
    # batch composition changes too, not just the order
    assert {tuple(b) for b in plans[0]} != {tuple(b) for b in plans[1]}
    assert BucketBatchSampler(lengths, batch_size=8, seed=4).plan(0) != plans[0]
    u = BucketBatchSampler(lengths, batch_size=8, shuffle=False)
    flat = [i for b in u.plan(0) for i in b]
    assert flat == np.argsort(-lengths, kind="stable").tolist()
    assert u.plan(0) == u.plan(5)


def test_len_is_the_same_every_epoch_with_a_budget():
    lengths = np.random.default_rng(2).integers(1, 50, 300)
    s = BucketBatchSampler(lengths, max_tokens=120, num_replicas=3, rank=1)
    assert {len(s.plan(e)) for e in range(5)} == {len(s)}


# ------------------------------------------------------------------ resume


def test_resume_mid_epoch_gives_the_identical_remaining_batches():
    lengths = np.random.default_rng(3).integers(1, 30, 200)
    kw = dict(batch_size=7, seed=11, num_replicas=2, rank=1)
    a = BucketBatchSampler(lengths, **kw)
    a.set_epoch(2)
    it = iter(a)
    head = [next(it) for _ in range(5)]
    state = a.state_dict()
    assert state["epoch"] == 2 and state["position"] == 5
    rest = list(it)

    b = BucketBatchSampler(lengths, **kw)
    b.load_state_dict(state)
    b.set_epoch(2)  # what a trainer's epoch loop does: same epoch keeps the position
    assert b.position == 5
    assert list(b) == rest
    assert head + rest == a.plan(2)
    assert list(b) == a.plan(2)  # the next pass of the same epoch starts from the top


def test_state_after_a_full_epoch_resumes_into_an_empty_pass():
    s = BucketBatchSampler(LENS, batch_size=3, seed=0)
    assert len(list(s)) == 4
    state = s.state_dict()
    assert (state["epoch"], state["position"]) == (0, 4)
    t = BucketBatchSampler(LENS, batch_size=3, seed=0)
    t.load_state_dict(state)
    assert list(t) == []
    t.set_epoch(1)
    assert t.position == 0 and list(t) == s.plan(1)


def test_state_must_match_the_sampler():
    state = BucketBatchSampler(LENS, batch_size=3, seed=0).state_dict()
    for other in (dict(batch_size=4, seed=0), dict(batch_size=3, seed=1)):
        with pytest.raises(ValueError, match="does not match"):
            BucketBatchSampler(LENS, **other).load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        BucketBatchSampler(LENS[::-1], batch_size=3, seed=0).load_state_dict(state)
    with pytest.raises(ValueError, match=r"batches_consumed must be in \[0, 4\]"):
        BucketBatchSampler(LENS, batch_size=3).state_dict(batches_consumed=5)


class _Indices(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def test_prefetching_loader_resumes_from_batches_consumed():
    lengths = np.random.default_rng(4).integers(1, 30, 120)
    sampler = BucketBatchSampler(lengths, batch_size=5, seed=7)
    loader = DataLoader(_Indices(len(lengths)), batch_sampler=sampler, num_workers=2, collate_fn=list)
    consumed = []
    for batch in loader:
        consumed.append(batch)
        if len(consumed) == 6:
            break
    assert sampler.position > 6  # the workers drew ahead of what training consumed
    state = sampler.state_dict(batches_consumed=len(consumed))
    del loader

    resumed = BucketBatchSampler(lengths, batch_size=5, seed=7)
    resumed.load_state_dict(state)
    assert consumed + list(resumed) == sampler.plan(0)


# ---------------------------------------------------------------- real data


@pytest.mark.slow
def test_padding_efficiency_on_wikitext2(wikitext2):
    with open(wikitext2 / "train.txt", encoding="utf-8") as f:
        lengths = np.array([len(line.split()) + 2 for line in f])  # <bos> words <eos>
    assert lengths.size == 36718
    s = BucketBatchSampler(lengths, batch_size=32, seed=0)
    for epoch in range(3):
        plan = s.plan(epoch)
        real = sum(int(lengths[b].sum()) for b in plan)
        padded = sum(len(b) * int(lengths[b].max()) for b in plan)
        assert real == lengths.sum()
        assert real / padded >= 0.99, (epoch, real / padded)


# ------------------------------------------------- elastic resume, global counts


def _consume(lengths, world: int, steps: int, epoch: int = 0, state=None, **kw):
    """Run ``world`` ranks for ``steps`` steps of ``epoch`` (all of it when ``steps`` is None),
    from ``state`` if given: (indices seen per step, the state after, the samplers)."""
    samplers = [BucketBatchSampler(lengths, num_replicas=world, rank=r, **kw) for r in range(world)]
    for s in samplers:
        if state is not None:
            s.load_state_dict(state)
        s.set_epoch(epoch)
    its = [iter(s) for s in samplers]
    seen = []
    for _ in range(steps if steps is not None else samplers[0].epoch_length - samplers[0].position):
        seen.append([next(it) for it in its])
    lengths_ok = {s.epoch_length for s in samplers}
    assert len(lengths_ok) == 1  # every rank has the same number of steps: DDP does not hang
    return seen, samplers[0].state_dict(), samplers


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (3, 2), (2, 3), (2, 4)])
@pytest.mark.parametrize("kw", [dict(batch_size=7), dict(max_tokens=60, shuffle=False), dict(max_tokens=80, cost="padded")])
def test_resume_on_another_number_of_ranks_sees_every_sequence_once(before, after, kw):
    lengths = np.random.default_rng(5).integers(1, 30, 211)
    kw = dict(seed=3, **kw)
    head, state, _ = _consume(lengths, before, 4, epoch=2, **kw)
    assert state["consumed"] == 4 * before and state["num_replicas"] == before
    tail, end, resumed = _consume(lengths, after, None, epoch=2, state=state, **kw)
    assert resumed[0].position == resumed[0].epoch_length == 4 + len(tail)
    seen = [i for step in head + tail for batch in step for i in batch]
    assert sorted(seen) == list(range(len(lengths)))  # exactly once each
    # the rest is the old plan's rest: the same batches, split only to divide among the ranks
    old = BucketBatchSampler(lengths, num_replicas=before, rank=0, **kw)._global_plan(2, before)
    rest = [sorted(old[0][s:e].tolist()) for s, e in old[1][4 * before:].tolist()]
    got = [sorted(b) for step in tail for b in step]
    assert len(got) - len(rest) == -len(rest) % after
    assert all(any(set(g) <= set(r) for r in rest) for g in got)
    # the next epoch is a fresh plan for the new number of ranks
    for s in resumed:
        s.set_epoch(3)
    fresh = [BucketBatchSampler(lengths, num_replicas=after, rank=r, **kw) for r in range(after)]
    for s in fresh:
        s.set_epoch(3)
    assert [s.plan() for s in resumed] == [s.plan() for s in fresh]
    assert end["consumed"] == 4 * before + len(got)


def test_two_ranks_to_one_and_back_exact_indices():
    """2 ranks stop after 2 steps, 1 rank runs 3 steps, 2 ranks finish: every index once."""
    lengths = [5, 3, 3, 8, 1, 2, 2, 2, 7, 4, 6, 6, 1, 9, 3, 2]
    kw = dict(batch_size=2, seed=0)
    a, s1, _ = _consume(lengths, 2, 2, **kw)
    b, s2, one = _consume(lengths, 1, 3, state=s1, **kw)
    assert (s2["consumed"], s2["segments"]) == (4 + 3, [[2, 0], [1, 4]])
    c, s3, two = _consume(lengths, 2, None, state=s2, **kw)
    seen = [i for step in a + b + c for batch in step for i in batch]
    assert sorted(seen) == list(range(len(lengths)))
    full = BucketBatchSampler(lengths, num_replicas=2, **kw)._global_plan(0, 2)
    plan = [full[0][s:e].tolist() for s, e in full[1].tolist()]  # 8 batches of 2, dealt 0,1,0,1,...
    assert a == [[plan[0], plan[1]], [plan[2], plan[3]]] and b == [[plan[4]], [plan[5]], [plan[6]]]
    assert c == [[plan[7][:1], plan[7][1:]]]  # one batch left for two ranks: split in halves
    assert two[0].epoch_length == 2 + 3 + 1 and s3["consumed"] == 9


def test_elastic_resume_with_drop_last_drops_only_what_does_not_divide():
    lengths = np.random.default_rng(6).integers(1, 30, 100)
    kw = dict(batch_size=10, seed=1, drop_last=True)
    head, state, _ = _consume(lengths, 1, 3, **kw)  # 10 batches; 7 left for 2 ranks: 6 dealt
    tail, _, _ = _consume(lengths, 2, None, state=state, **kw)
    assert len(tail) == 3 and len({i for st_ in head + tail for b in st_ for i in b}) == 90


def test_elastic_resume_that_cannot_divide_is_a_clear_error():
    lengths = [4, 3, 2, 1]
    _, state, _ = _consume(lengths, 1, 3, batch_size=1, seed=0)  # one batch of one sequence left
    s = BucketBatchSampler(lengths, batch_size=1, seed=0, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="cannot deal the rest of epoch 0"):
        s.load_state_dict(state)
    assert s.position == 0 and s.plan() == BucketBatchSampler(lengths, batch_size=1, seed=0, num_replicas=2).plan()


def test_state_from_before_elastic_resume_still_loads():
    lengths = np.random.default_rng(7).integers(1, 30, 90)
    a = BucketBatchSampler(lengths, batch_size=6, seed=2, num_replicas=2, rank=1)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    config = {**a.state_dict()["config"], "num_replicas": 2}
    old = {"epoch": 0, "position": 3, "config": config}  # the earlier format
    b = BucketBatchSampler(lengths, batch_size=6, seed=2, num_replicas=2, rank=1)
    b.load_state_dict(old)
    assert head + list(b) == a.plan(0)


@pytest.mark.parametrize("world", [1, 3])
def test_global_counts_are_the_sum_over_all_ranks(world):
    lengths = np.random.default_rng(8).integers(1, 40, 150)
    kw = dict(max_tokens=90, seed=4)
    plans = all_ranks(lengths, world, **kw)
    s = BucketBatchSampler(lengths, num_replicas=world, rank=world - 1, **kw)
    for step in range(len(s)):
        batches = [p[step] for p in plans]
        want = (sum(map(len, batches)), int(sum(lengths[i] for b in batches for i in b)))
        assert s.global_counts(step) == want
    with pytest.raises(ValueError, match="step must be in"):
        s.global_counts(len(s))


def test_global_counts_after_elastic_resume():
    lengths = np.random.default_rng(9).integers(1, 40, 120)
    kw = dict(batch_size=5, seed=4)
    head, state, _ = _consume(lengths, 2, 3, **kw)
    tail, _, resumed = _consume(lengths, 3, None, state=state, **kw)
    s = resumed[1]
    for step, batches in enumerate(head + tail):
        assert s.global_counts(step) == (sum(map(len, batches)), int(sum(lengths[i] for b in batches for i in b)))


def test_state_at_a_position_before_the_change_of_ranks():
    """A trainer that finished an elastic epoch saves position 0 of it before set_epoch(next):
    the state keeps only the first segment, and loads into a plain start of that epoch."""
    lengths = np.random.default_rng(10).integers(1, 30, 80)
    kw = dict(batch_size=5, seed=2)
    _, state, _ = _consume(lengths, 2, 3, **kw)
    _, _, one = _consume(lengths, 1, None, state=state, **kw)
    s = one[0]
    assert s.state_dict(batches_consumed=s.epoch_length)["consumed"] == 16  # all 16 batches of 5
    zero = s.state_dict(batches_consumed=0)
    assert (zero["position"], zero["consumed"], zero["segments"], zero["num_replicas"]) == (0, 0, [[2, 0]], 2)
    two = s.state_dict(batches_consumed=2)  # mid first segment: 2 steps of 2 ranks
    assert (two["consumed"], two["segments"]) == (4, [[2, 0]])
    fresh = BucketBatchSampler(lengths, **kw)
    fresh.load_state_dict(zero)
    assert fresh.position == 0 and len(list(fresh)) == 16  # the epoch from the top, on one rank
    assert s.epoch_length == 3 + 10
    with pytest.raises(ValueError, match=r"batches_consumed must be in \[0, 13\]"):
        s.state_dict(batches_consumed=14)
