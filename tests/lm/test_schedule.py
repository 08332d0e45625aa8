"""Schedules: teacher-forcing ratio per step (constant, linear, exponential, inverse
sigmoid) and learning rate (warmup, cosine, plateau annealing, state round trip), exact."""
from __future__ import annotations

import math

import pytest

from lm.config import TeacherForcingConfig, TrainConfig
from lm.schedule import LRSchedule, teacher_forcing_ratio


def tf(step: int, **cfg) -> float:
    return teacher_forcing_ratio(TeacherForcingConfig(**cfg), step)


# --------------------------------------------------------------------------- teacher forcing


def test_constant_is_start_at_every_step_and_ignores_end():
    assert [tf(i, schedule="constant", start=0.7) for i in (0, 1, 10**9)] == [0.7, 0.7, 0.7]
    assert tf(5, schedule="constant", start=0.3, end=0.5) == 0.3  # end is a floor for decays only


def test_linear_decays_to_end_at_decay_steps_then_stays():
    cfg = dict(schedule="linear", start=1.0, end=0.2, decay_steps=10)
    got = [tf(i, **cfg) for i in (0, 1, 5, 9, 10, 11, 10**6)]
    want = [1.0, 1.0 - 0.8 * 0.1, 0.6, 1.0 - 0.8 * 0.9, 0.2, 0.2, 0.2]
    assert got == pytest.approx(want, abs=1e-15)
    assert got[4:] == [got[4]] * 3  # clamped: exactly end from decay_steps on


def test_exponential_is_start_times_k_to_the_step_floored_at_end():
    cfg = dict(schedule="exponential", start=0.8, end=0.1, k=0.5)
    assert [tf(i, **cfg) for i in range(5)] == [0.8, 0.4, 0.2, 0.1, 0.1]  # 0.05 < end at step 4
    assert tf(3, schedule="exponential", start=1.0, end=0.0, k=0.9) == pytest.approx(0.729, abs=1e-15)


@pytest.mark.parametrize("k", [1.0, 10.0, 250.0])
def test_inverse_sigmoid_is_k_over_k_plus_exp_step_over_k(k):
    for i in (0, 1, 7, 100, 1000):
        want = max(0.05, k / (k + math.exp(min(i / k, 700.0))))
        assert tf(i, schedule="inverse_sigmoid", k=k, end=0.05) == pytest.approx(want, rel=1e-15)
    assert tf(0, schedule="inverse_sigmoid", k=k) == pytest.approx(k / (k + 1.0), rel=1e-15)


def test_inverse_sigmoid_far_out_reaches_end_without_overflow():
    assert 0.0 < tf(10**9, schedule="inverse_sigmoid", k=1.0, end=0.0) < 1e-300  # exp capped at e^700
    assert tf(10**9, schedule="inverse_sigmoid", k=1.0, end=0.25) == 0.25


def test_inverse_sigmoid_does_not_read_start():
    assert tf(0, schedule="inverse_sigmoid", k=20.0, start=0.5) == tf(0, schedule="inverse_sigmoid", k=20.0) == 20 / 21


@pytest.mark.parametrize("schedule,extra", [("linear", {"decay_steps": 50}), ("exponential", {"k": 0.97}),
                                            ("inverse_sigmoid", {"k": 20.0})])
def test_decays_never_increase(schedule, extra):
    values = [tf(i, schedule=schedule, start=0.9, end=0.1, **extra) for i in range(300)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert min(values) >= 0.1 and values[-1] < values[0]


# --------------------------------------------------------------------------- learning rate


class StepBudget:
    """An ``LRSchedule`` driven by a step budget, as the trainer drives it: the fraction of
    the budget spent is ``step / total_steps`` (0 without a step budget)."""

    def __init__(self, total_steps: int | None, cfg: TrainConfig) -> None:
        self.schedule, self.total = LRSchedule(cfg), total_steps

    def __call__(self, step: int) -> float:
        return self.schedule(step, min(1.0, step / self.total) if self.total else 0.0)

    def __getattr__(self, name):
        return getattr(self.schedule, name)


def lr_schedule(total_steps: int | None = None, **cfg) -> StepBudget:
    return StepBudget(total_steps, TrainConfig(**cfg))


def test_warmup_is_linear_from_base_over_warmup_steps():
    s = lr_schedule(lr=1.0, warmup_steps=4, schedule="constant")
    assert [s(i) for i in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]


def test_cosine_after_warmup_reaches_min_lr_at_total_steps():
    s = lr_schedule(14, lr=1.0, min_lr=0.1, warmup_steps=4, schedule="cosine")
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # span = 14 - 4 = 10 steps of cosine: progress (step - 4) / 10
    for step in (4, 6, 9, 13, 14, 20):
        progress = min(1.0, (step - 4) / 10)
        assert s(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)), abs=1e-12)
    assert s(4) == 1.0
    assert s(9) == pytest.approx(0.55, abs=1e-12)
    assert s(14) == pytest.approx(0.1, abs=1e-12) and s(1000) == pytest.approx(0.1, abs=1e-12)
    assert s.warm_end == pytest.approx(4 / 14, abs=1e-15)


def test_cosine_on_a_time_budget_ends_at_the_stop_and_resumes_exactly():
    """With max_time the fraction is the time spent: the decay ends exactly at the stop."""
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=2, schedule="cosine", epochs=None, max_time=100.0)
    a = LRSchedule(cfg)
    assert [a(0, 0.01), a(1, 0.02)] == [0.5, 1.0]  # warmup counts steps
    assert a(2, 0.2) == 1.0 and a.warm_end == 0.2  # the cosine spans the remaining 80%
    assert a(50, 0.6) == pytest.approx(0.5, abs=1e-12)
    assert a(99, 1.0) == pytest.approx(0.0, abs=1e-12)
    b = LRSchedule(cfg)
    b.load_state_dict(a.state_dict())
    assert [b(s, f) for s, f in ((60, 0.7), (70, 0.9))] == [a(60, 0.7), a(70, 0.9)]


def test_cosine_without_warmup_starts_at_base():
    s = lr_schedule(100, lr=0.5, schedule="cosine")
    assert s(0) == 0.5 and s(50) == pytest.approx(0.25, abs=1e-15) and s(100) == 0.0


def test_plateau_anneals_by_factor_only_when_validation_does_not_improve():
    s = lr_schedule(lr=1.0, schedule="plateau", plateau_factor=0.25)
    seen = []
    for loss in (3.0, 2.5, 2.5, 2.6, 2.4, 2.45):  # first, better, equal, worse, better, worse
        s.on_validation(loss)
        seen.append(s(1000))
    assert seen == [1.0, 1.0, 0.25, 0.0625, 0.0625, 0.015625]
    assert s.best == 2.4


def test_plateau_never_goes_below_min_lr_and_warmup_uses_the_annealed_rate():
    s = lr_schedule(lr=1.0, min_lr=0.1, schedule="plateau", plateau_factor=0.25, warmup_steps=2)
    for loss in (1.0, 1.0, 1.0, 1.0):
        s.on_validation(loss)
    assert s(100) == 0.1
    assert s(0) == pytest.approx(0.05, abs=1e-15)  # warmup from the current base


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_other_schedules_ignore_validation_but_track_the_best(schedule):
    s = lr_schedule(10, lr=0.3, schedule=schedule)
    before = [s(i) for i in range(12)]
    for loss in (2.0, 3.0, 3.0, 1.5):
        s.on_validation(loss)
    assert [s(i) for i in range(12)] == before
    assert s.best == 1.5


def test_state_dict_round_trip_continues_identically():
    a = lr_schedule(20, lr=1.0, schedule="plateau", plateau_factor=0.5, warmup_steps=3)
    for loss in (2.0, 2.1, 1.9, 1.95):
        a.on_validation(loss)
    state = a.state_dict()
    assert state == {"base": 0.25, "best": 1.9, "warm_end": None}
    b = lr_schedule(20, lr=1.0, schedule="plateau", plateau_factor=0.5, warmup_steps=3)
    b.load_state_dict(state)
    assert [b(i) for i in range(25)] == [a(i) for i in range(25)]
    for loss in (1.8, 1.85, 1.85):
        a.on_validation(loss)
        b.on_validation(loss)
    assert b.state_dict() == a.state_dict() == {"base": 0.0625, "best": 1.8, "warm_end": None}


def test_state_dict_of_a_fresh_schedule_holds_an_infinite_best():
    s = lr_schedule(lr=0.01)
    t = lr_schedule(lr=0.5)
    t.load_state_dict(s.state_dict())
    assert t.base == 0.01 and math.isinf(t.best)


def test_epoch_decay_is_zaremba_et_al_s_schedule():
    """lr for 4 epochs, then halved every epoch: epochs 0-3 at 1.0, epoch 4 at 0.5, epoch 12 at 1/512."""
    s = LRSchedule(TrainConfig(lr=1.0, schedule="epoch_decay", decay_start=4, decay_factor=0.5))
    assert [s(0, 0.0, e) for e in range(13)] == [1.0] * 4 + [0.5 ** k for k in range(1, 10)]
    s.on_validation(3.0)
    s.on_validation(4.0)  # validation does not steer it
    assert s(0, 0.0, 4) == 0.5
