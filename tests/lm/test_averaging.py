"""NT-ASGD's averaged weights: exact running mean, swap in and back, exact resume, trigger rule."""
from __future__ import annotations

import copy

import pytest
import torch

from lm.averaging import WeightAverage, nonmono_triggered
from lm.model import RNNLM
from pipeline.collate import PackedCollator

SEQS = [[1, 5, 9, 2, 7, 3], [1, 4, 2], [1, 8, 8, 6, 5, 11, 2]]


def make_model() -> RNNLM:
    torch.manual_seed(0)
    return RNNLM(13, cell="lstm", embed_dim=8, hidden_size=8, num_layers=2, tie_weights=True)


def sgd_steps(model: RNNLM, opt: torch.optim.Optimizer, avg: WeightAverage, n: int) -> list[dict]:
    """n SGD steps, each followed by avg.update(); the parameters after each step."""
    batch = PackedCollator()(SEQS)
    snaps = []
    for _ in range(n):
        opt.zero_grad()
        model(batch).loss.backward()
        opt.step()
        avg.update()
        snaps.append({k: v.detach().clone() for k, v in model.named_parameters()})
    return snaps


def test_averaged_weights_are_the_running_mean_from_the_start_step():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    avg = WeightAverage(model, nonmono=None)
    sgd_steps(model, opt, avg, 2)  # before start: not averaged
    assert not avg.active and avg.count == 0
    avg.start(step=2)
    snaps = sgd_steps(model, opt, avg, 4)
    assert avg.count == 4 and set(avg.averaged()) == set(dict(model.named_parameters()))  # tied matrix once
    for name, got in avg.averaged().items():
        total = torch.zeros_like(got, dtype=torch.float64)
        for s in snaps:
            total += s[name]
        assert torch.equal(got, (total / 4).float())
        torch.testing.assert_close(got, torch.stack([s[name] for s in snaps]).mean(0), atol=1e-7, rtol=0)
    assert not torch.equal(avg.averaged()["rnn.weight_hh_l0"], snaps[-1]["rnn.weight_hh_l0"])


def test_swapped_evaluates_with_the_average_then_restores_exactly():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    avg = WeightAverage(model, nonmono=None)
    with avg.swapped() as swapped:
        assert not swapped  # nothing averaged yet: the trained weights stay
    avg.start(step=0)
    sgd_steps(model, opt, avg, 3)
    trained = copy.deepcopy(model.state_dict())
    mean = avg.averaged()
    with avg.swapped() as swapped:
        assert swapped
        for name, p in model.named_parameters():
            assert torch.equal(p, mean[name])
        assert model.head.weight is model.embed.weight  # tying survives the swap
    for name, p in model.state_dict().items():
        assert torch.equal(p, trained[name])


def test_state_dict_resumes_the_average_exactly():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    avg = WeightAverage(model, nonmono=3)
    for loss in (5.0, 4.0, 3.0, 3.5):
        avg.on_validation(loss, step=0)
    avg.start(step=1)
    sgd_steps(model, opt, avg, 2)
    clone = copy.deepcopy(model)
    clone_opt = torch.optim.SGD(clone.parameters(), lr=0.5)
    clone_opt.load_state_dict(opt.state_dict())
    resumed = WeightAverage(clone, nonmono=3)
    resumed.load_state_dict(avg.state_dict())
    assert resumed.history == [5.0, 4.0, 3.0, 3.5] and resumed.start_step == 1 and resumed.count == 2
    sgd_steps(model, opt, avg, 2)
    sgd_steps(clone, clone_opt, resumed, 2)
    for name, a in avg.averaged().items():
        assert torch.equal(resumed.averaged()[name], a)
    with pytest.raises(ValueError, match="differ"):
        WeightAverage(RNNLM(13, embed_dim=8, hidden_size=8, num_layers=1)).load_state_dict(avg.state_dict())


def test_nonmono_trigger_rule():
    h = [5.0, 4.0, 3.0, 3.5, 3.6, 3.7]
    assert nonmono_triggered(h, 3.2, 3)  # worse than min(5, 4, 3) from before the last 3
    assert not nonmono_triggered(h, 2.9, 3)  # improved on it
    assert not nonmono_triggered(h, 3.0, 3)  # equal is not worse
    assert not nonmono_triggered(h[:3], 9.9, 3)  # too few evaluations yet
    # only evaluations from before the last 3 set the bar: with [5 | 4, 3, 3.5] it is 5
    assert nonmono_triggered(h[:4], 5.01, 3) and not nonmono_triggered(h[:4], 4.9, 3)


def test_on_validation_starts_once_at_the_trigger():
    avg = WeightAverage(make_model(), nonmono=2)
    fired = [avg.on_validation(loss, step) for step, loss in enumerate([4.0, 3.0, 2.0, 2.5, 2.1, 5.0, 6.0])]
    # bars min(h[:-2]): step 3: 4 (2.5 better), step 4: 3 (2.1 better), step 5: 2 (5.0 worse: fire)
    assert fired == [False, False, False, False, False, True, False]
    assert avg.start_step == 5 and avg.history == [4.0, 3.0, 2.0, 2.5, 2.1, 5.0, 6.0]
    with pytest.raises(RuntimeError, match="already started at step 5"):
        avg.start(7)
    never = WeightAverage(make_model(), nonmono=None)
    assert not any(never.on_validation(x, i) for i, x in enumerate([1.0, 2.0, 3.0, 4.0]))
