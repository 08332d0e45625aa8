"""The AWD-LSTM regularisers: exact masks and penalties on small cases, against
references computed independently of the model's code paths, and agreement of the
fused, padded, fused-loss and step-loop paths when they are all on."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_packed_sequence

from lm.config import ModelConfig
from lm.model import RNNLM, build_model
from lm.regularize import activation_penalty, previous_step_index
from lm.rnn import layer_weights, run_rnn
from pipeline.collate import PackedBatch, PackedCollator

CELLS = ["gru", "lstm", "rnn"]
V = 23
SEQS = [  # not sorted by length: the caller's order differs from the packed order
    [1, 5, 9, 2, 7, 3],
    [1, 4, 2],
    [1, 8, 8, 6, 5, 11, 12, 13, 2],
    [1, 3],
    [1, 10, 14, 2, 2, 6],
]
ALL_ON = dict(dropout_emb=0.2, dropout_out=0.3, dropout_rnn=0.4, locked_dropout=True, locked_dropout_rnn=True,
              weight_drop=0.5, dropout_words=0.2, ar=2.0, tar=1.0)


def make_batch(seqs: list[list[int]]) -> PackedBatch:
    return PackedCollator()(seqs)


def make_model(cell: str, seed: int = 0, **kw) -> RNNLM:
    torch.manual_seed(seed)
    return RNNLM(V, **{"cell": cell, "embed_dim": 16, "hidden_size": 16, "num_layers": 2, **kw})


def unpack(data: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Packed (N, ...) -> (L, B, ...) in the caller's order."""
    return pad_packed_sequence(batch.inputs._replace(data=data))[0]


def sorted_row(batch: PackedBatch) -> dict[int, int]:
    """Caller's index -> row in the packed (longest-first) order, where per-sequence masks live."""
    return {int(i): j for j, i in enumerate(batch.inputs.sorted_indices)}


def single_layer(rnn: nn.RNNBase, k: int) -> nn.RNNBase:
    """Layer ``k`` of ``rnn`` as its own one-layer module, weights copied."""
    layer = type(rnn)(rnn.input_size if k == 0 else rnn.hidden_size, rnn.hidden_size, 1)
    layer.load_state_dict({n.replace(f"_l{k}", "_l0"): p for n, p in rnn.state_dict().items() if n.endswith(f"_l{k}")})
    return layer


# -- the explicit-weights kernel call --------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_run_rnn_with_own_weights_equals_the_module(cell):
    """Packed and padded, all layers in one call or one call per layer (with multiplier 1
    between them): what the module itself computes, states in the same (sorted) order."""
    torch.manual_seed(0)
    rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cell](8, 6, 3)
    batch = make_batch(SEQS)
    x = batch.inputs._replace(data=torch.randn(batch.inputs.data.numel(), 8))  # (N, 8)
    arity = 2 if cell == "lstm" else 1
    hx = tuple(torch.randn(3, len(SEQS), 6) for _ in range(arity))  # sorted order
    unsort = batch.inputs.unsorted_indices
    caller = tuple(s[:, unsort] for s in hx)  # the module takes and returns the caller's order
    ref_out, ref_h = rnn(x, caller[0] if arity == 1 else caller)
    ref_h = (ref_h,) if arity == 1 else ref_h
    ones = [torch.ones(1, 6)] * 2
    for between in (None, ones):
        out, h = run_rnn(rnn, x.data, x.batch_sizes, hx, layer_weights(rnn), between)
        torch.testing.assert_close(out, ref_out.data, atol=1e-6, rtol=0)
        for a, b in zip(h, ref_h):
            torch.testing.assert_close(a[:, unsort], b, atol=1e-6, rtol=0)
    padded = torch.randn(4, 3, 8)  # (T, B, E)
    hx3 = tuple(s[:, :3] for s in hx)
    ref_out, _ = rnn(padded, hx3[0] if arity == 1 else hx3)
    out, _ = run_rnn(rnn, padded, None, hx3, layer_weights(rnn), [torch.ones(1, 1, 6)] * 2)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="3 layers need 2"):
        run_rnn(rnn, padded, None, hx3, layer_weights(rnn), ones[:1])


# -- weight drop -------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_is_one_dropconnect_mask_per_call(cell):
    model = make_model(cell, weight_drop=0.5).train()
    batch = make_batch(SEQS)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no per-call warning from the substituted weights
        out = model(batch)
    torch.manual_seed(3)  # the same draws: one (H*gates, H) mask per layer, in layer order
    masks = [F.dropout(torch.ones_like(getattr(model.rnn, f"weight_hh_l{k}")), 0.5) for k in range(2)]
    assert all(0.4 < (m == 0).float().mean() < 0.6 for m in masks)
    ref = copy.deepcopy(model.rnn)  # the module with its recurrent matrices masked, nothing else changed
    with torch.no_grad():
        for k, m in enumerate(masks):
            getattr(ref, f"weight_hh_l{k}").mul_(m)
    h = ref(batch.inputs._replace(data=model.embed(batch.inputs.data)))[0].data  # (N, H)
    torch.testing.assert_close(out.logits, model.head(h), atol=1e-6, rtol=0)
    torch.manual_seed(3)  # the step loop applies the same dropped matrix at every step
    torch.testing.assert_close(model(batch, stepwise=True).logits, out.logits, atol=1e-6, rtol=0)
    out.loss.backward()  # the gradient reaches the raw matrix, through the mask
    for k, m in enumerate(masks):
        g = getattr(model.rnn, f"weight_hh_l{k}").grad
        assert not g[m == 0].any() and g[m != 0].any()
    model.eval()  # evaluation uses the whole matrix
    torch.testing.assert_close(model(batch).logits, make_model(cell).eval()(batch).logits, atol=0, rtol=0)


# -- embedding dropout -------------------------------------------------------------------


def test_word_dropout_drops_whole_words_for_the_batch():
    model = make_model("gru", dropout_words=0.5).train()
    batch = make_batch(SEQS)
    seen = []
    model.rnn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].data))  # the RNN's input (N, E)
    torch.manual_seed(4)
    model(batch)
    torch.manual_seed(4)
    scale = torch.empty(V).bernoulli_(0.5) / 0.5  # (V,) the documented draw
    ids = batch.inputs.data  # (N,)
    assert torch.equal(seen[0], model.embed.weight[ids] * scale[ids, None])
    dropped = kept = 0
    for i in ids.unique().tolist():
        rows = seen[0][ids == i]  # every occurrence of word i in the batch
        if rows.any():
            assert torch.equal(rows, (2 * model.embed.weight[i]).expand_as(rows))
            kept += 1
        else:
            dropped += 1
    assert dropped and kept  # not vacuous at this seed
    tied = make_model("gru", dropout_words=0.5, tie_weights=True).train()
    torch.manual_seed(4)
    out = tied(batch)  # the tied output layer scores with the whole matrix
    torch.testing.assert_close(out.logits, F.linear(tied.rnn(batch.inputs._replace(
        data=tied.embed(ids) * scale[ids, None]))[0].data, tied.embed.weight, tied.head.bias), atol=1e-6, rtol=0)


# -- locked dropout between layers --------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_locked_dropout_between_layers_is_one_mask_per_sequence(cell):
    """Reference: each sequence run alone through two one-layer modules, its own mask row
    multiplying layer 0's output at every time step."""
    model = make_model(cell, dropout_rnn=0.5, locked_dropout_rnn=True).train()
    assert model.rnn.dropout == 0.0  # torch's per-step dropout is not applied as well
    batch = make_batch(SEQS)
    torch.manual_seed(9)
    out = model(batch)
    torch.manual_seed(9)
    mask = torch.empty(len(SEQS), 16).bernoulli_(0.5) / 0.5  # (B, H) one row per sequence, sorted rows
    rows = sorted_row(batch)
    layer0, layer1 = single_layer(model.rnn, 0), single_layer(model.rnn, 1)
    got = unpack(out.logits, batch)  # (L, B, V)
    for b, s in enumerate(SEQS):
        x = model.embed(torch.tensor(s[:-1]))[:, None]  # (L_b, 1, E)
        h0, s0 = layer0(x)
        h1, s1 = layer1(h0 * mask[rows[b]])
        torch.testing.assert_close(got[: len(s) - 1, b], model.head(h1[:, 0]), atol=1e-6, rtol=0)
        s0, s1 = (s0,) if cell != "lstm" else s0, (s1,) if cell != "lstm" else s1
        for final, a, c in zip(out.state, s0, s1):
            torch.testing.assert_close(final[:, b], torch.cat([a, c])[:, 0], atol=1e-6, rtol=0)
    assert not torch.allclose(out.logits, model.eval()(batch).logits)  # the masks did act


# -- AR / TAR -----------------------------------------------------------------------------


def test_previous_step_index_follows_each_sequence():
    # sorted rows: A (3 steps), B (2 steps), C (1 step); packed: A0 B0 C0 A1 B1 A2
    cur, prev = previous_step_index(torch.tensor([3, 2, 1]))
    assert cur.tolist() == [3, 4, 5] and prev.tolist() == [0, 1, 3]


def test_activation_penalty_exact_on_known_activations():
    """Sequences A = [1, 3, 6] and B = [2, 2] (features x and -x), packed A B A B A."""
    raw = torch.tensor([1.0, 2.0, 3.0, 2.0, 6.0])[:, None] * torch.tensor([1.0, -1.0])  # (N=5, H=2)
    dropped = 2 * raw  # stands in for the output-dropped activations
    sizes = torch.tensor([2, 2, 1])
    ar = (4 * (1 + 4 + 9 + 4 + 36)) / 5  # mean of dropped^2 over 5 tokens x 2 features (equal features)
    tar = (2**2 + 0**2 + 3**2) / 3  # A: 3-1, 6-3; B: 2-2 -- never across sequences
    assert activation_penalty(dropped, raw, sizes, 2.0, 0.0).item() == pytest.approx(2 * ar, rel=1e-7)
    assert activation_penalty(dropped, raw, sizes, 0.0, 1.0).item() == pytest.approx(tar, rel=1e-7)
    assert activation_penalty(dropped, raw, sizes, 2.0, 0.5).item() == pytest.approx(2 * ar + 0.5 * tar, rel=1e-7)
    assert activation_penalty(dropped[:2], raw[:2], sizes[:1], 0.0, 1.0).item() == 0.0  # one step: no pairs


@pytest.mark.parametrize("stepwise", [False, True])
def test_model_reg_is_ar_plus_tar_of_its_top_outputs(stepwise):
    """reg from the model's own top outputs, computed sequence by sequence (padded view);
    zero in evaluation and when both coefficients are 0; carried state changes nothing."""
    model = make_model("lstm", ar=2.0, tar=0.5).train()
    batch = make_batch(SEQS)
    seen = []
    model.head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    state = tuple(torch.randn(2, len(SEQS), 16) for _ in range(2))  # a stream window's carried state
    out = model(batch, state, stepwise=stepwise)
    h = unpack(torch.cat(seen), batch)  # (L, B, H) no output dropout: dropped == raw
    sq = sum(h[: len(s) - 1, b].pow(2).sum() for b, s in enumerate(SEQS))
    diff = sum((h[1 : len(s) - 1, b] - h[: len(s) - 2, b]).pow(2).sum() for b, s in enumerate(SEQS))
    n = sum(len(s) - 1 for s in SEQS)
    expected = 2.0 * sq / (n * 16) + 0.5 * diff / ((n - len(SEQS)) * 16)
    torch.testing.assert_close(out.reg, expected, atol=1e-6, rtol=1e-6)
    assert out.reg.requires_grad and torch.equal(out.loss, out.nll_sum / n)  # the loss stays pure NLL
    assert model.eval()(batch).reg.item() == 0.0
    assert make_model("lstm").train()(batch).reg.item() == 0.0


# -- all together -------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS)
def test_every_path_draws_the_same_regularisers(cell):
    """All regularisers on, a carried state in, 3 layers: the fused packed call, the padded
    CPU kernel, the fused CPU loss and the step loop (scheduled sampling's) give the same
    loss, penalty, gradients and state from the same seed, and every parameter gets a
    gradient (DDP needs no find_unused_parameters for these)."""
    model = make_model(cell, num_layers=3, **ALL_ON).train()
    batch = make_batch(SEQS)
    state = tuple(torch.randn(3, len(SEQS), 16) for _ in model.init_state(1))
    runs = {}
    for name, kw in [("fused", {}), ("step", dict(stepwise=True)), ("padded", dict(need_state=False)),
                     ("fused_loss", dict(need_state=False, need_logits=False))]:
        torch.manual_seed(5)
        model.zero_grad()
        out = model(batch, state, **kw)
        (out.loss + out.reg).backward()
        assert all(p.grad is not None for p in model.parameters())
        runs[name] = out, [p.grad.clone() for p in model.parameters()]
    ref, ref_grads = runs["fused"]
    assert ref.reg.item() > 0
    for name, (out, grads) in runs.items():
        torch.testing.assert_close(out.nll_sum, ref.nll_sum, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.reg, ref.reg, atol=1e-6, rtol=1e-6)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    for a, b in zip(runs["step"][0].state, ref.state):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.manual_seed(6)  # another seed, other masks
    assert model(batch, state).nll_sum.item() != pytest.approx(ref.nll_sum.item(), abs=1e-4)
    model.eval()  # evaluation: none of them acts, the plain module call
    plain = make_model(cell, num_layers=3).eval()
    torch.testing.assert_close(model(batch, state).logits, plain(batch, state).logits, atol=0, rtol=0)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_scheduled_sampling_runs_with_every_regulariser(cell):
    model = make_model(cell, **ALL_ON).train()
    batch = make_batch(SEQS)
    outs = []
    for _ in range(2):
        torch.manual_seed(8)
        outs.append(model(batch, teacher_forcing=0.5, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(outs[0].logits, outs[1].logits) and torch.equal(outs[0].reg, outs[1].reg)
    (outs[0].loss + outs[0].reg).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_only_the_adaptive_softmax_leaves_parameters_unused():
    """The DDP find_unused_parameters condition: a batch whose targets are all in the
    adaptive softmax's head cluster gives its tail clusters no gradient."""
    batch = make_batch([[1, 2, 3, 4, 5], [1, 6, 7]])  # every target < 8
    for adaptive, unused in [(None, set()), ([8, 16], {"head.tail.0.0.weight", "head.tail.0.1.weight",
                                                       "head.tail.1.0.weight", "head.tail.1.1.weight"})]:
        model = make_model("lstm", adaptive_cutoffs=adaptive, **ALL_ON).train()
        out = model(batch)
        (out.loss + out.reg).backward()
        assert {n for n, p in model.named_parameters() if p.grad is None} == unused
        assert model.may_leave_parameters_unused == bool(unused)


def test_config_keys_reach_the_model_and_are_validated():
    m = build_model(ModelConfig(num_layers=2, dropout_rnn=0.3, locked_dropout_rnn=True, weight_drop=0.5,
                                dropout_words=0.1, ar=2.0, tar=1.0), V)
    assert (m.locked_dropout_rnn, m.dropout_rnn, m.weight_drop, m.dropout_words, m.ar, m.tar) == (True, 0.3, 0.5, 0.1, 2.0, 1.0)
    assert m.rnn.dropout == 0.0
    off = ModelConfig()
    assert (off.locked_dropout_rnn, off.weight_drop, off.dropout_words, off.ar, off.tar) == (False, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="locked_dropout_rnn=true needs num_layers >= 2"):
        ModelConfig(num_layers=1, locked_dropout_rnn=True)
    with pytest.raises(ValueError, match="dropout_rnn=0.0"):
        ModelConfig(dropout_rnn=0.0, locked_dropout_rnn=True)
    from pathlib import Path

    from lm.config import Recipe
    from pipeline.typed_yaml import from_dict
    from pipeline.errors import UserError

    with pytest.raises(UserError, match=r"^model.weight_drop=1.0: must be < 1$"):  # ranges: checked generically
        from_dict(Recipe, {"model": {"weight_drop": 1.0}}, "", Path("."))
    with pytest.raises(UserError, match=r"^model.ar=-1.0: must be >= 0$"):
        from_dict(Recipe, {"model": {"ar": -1.0}}, "", Path("."))
