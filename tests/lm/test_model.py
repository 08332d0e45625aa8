"""RNNLM and RNNEncoder: packed = padded, loss per real token, step loop = fused, state
interface, scheduled sampling, learning, tying, adaptive softmax."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_packed_sequence, pad_sequence

from lm import state as st
from lm.encoder import RNNEncoder
from lm.losses import linear_cross_entropy_sum
from lm.model import RNNLM, _sequence_rows
from pipeline.collate import PackedBatch, PackedCollator

CELLS = ["gru", "lstm", "rnn"]
V = 23
# Deliberately not sorted by length, so the caller's order differs from the packed order.
SEQS = [
    [1, 5, 9, 2, 7, 3],
    [1, 4, 2],
    [1, 8, 8, 6, 5, 11, 12, 13, 2],
    [1, 3],
    [1, 10, 14, 2, 2, 6],
]


def make_batch(seqs: list[list[int]]) -> PackedBatch:
    """Inputs seq[:-1], targets seq[1:], packed longest-first: the collator shifts, not the model."""
    return PackedCollator()(seqs)


def make_model(cell: str, seed: int = 0, **kw) -> RNNLM:
    torch.manual_seed(seed)
    cfg = dict(cell=cell, embed_dim=16, hidden_size=16, num_layers=2)
    cfg.update(kw)
    return RNNLM(V, **cfg)


def unpack(data: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """Per-token packed tensor (N, ...) -> (L, B, ...) in the caller's order."""
    return pad_packed_sequence(batch.inputs._replace(data=data))[0]


def test_sequence_rows_exact():
    assert _sequence_rows(torch.tensor([3, 3, 2, 1])).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 0]


EQUAL = [[1, 4, 6, 2], [1, 7, 9, 3], [1, 5, 5, 5]]  # the collator's equal-length (transpose) path


@pytest.mark.parametrize("seqs", [SEQS, EQUAL], ids=["ragged", "equal"])
@pytest.mark.parametrize("cell", CELLS)
def test_packed_forward_equals_padded_forward(cell, seqs):
    model = make_model(cell).eval()
    batch = make_batch(seqs)
    out = model(batch)
    padded = pad_sequence([torch.tensor(s[:-1]) for s in seqs], batch_first=True)  # (B, L)
    rnn_out, _ = model.rnn(model.embed(padded).transpose(0, 1))  # (L, B, H), padding included
    ref = model.head(rnn_out)  # (L, B, V)
    got = unpack(out.logits, batch)  # (L, B, V)
    for b, s in enumerate(seqs):
        n = len(s) - 1
        torch.testing.assert_close(got[:n, b], ref[:n, b], atol=1e-6, rtol=1e-5)
        assert torch.equal(got[n:, b], torch.zeros_like(got[n:, b]))


@pytest.mark.parametrize("cell", CELLS)
def test_padded_cpu_kernel_without_state_equals_packed(cell):
    """need_state=False runs a ragged CPU batch padded (oneDNN's fused kernel): the same
    logits, loss and gradients on real tokens, and no state."""
    batch = make_batch(SEQS)
    model = make_model(cell).eval()
    ref = model(batch)
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = model(batch, need_state=False)
    out.loss.backward()
    assert out.state is None and out.num_tokens == ref.num_tokens == 21
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, atol=1e-5, rtol=0)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_fused_output_layer_and_loss_equals_logits_path(tie):
    """need_logits=False (CPU, training): the chunked linear + cross-entropy gives the same
    loss and the same gradients, tied weights included, without forming the logits."""
    batch = make_batch(SEQS)
    model = make_model("lstm", tie_weights=tie)
    ref = model.eval()(batch)
    ref.loss.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out = model(batch, need_logits=False)
    out.loss.backward()
    assert out.logits is None and ref.logits is not None
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, atol=1e-5, rtol=0)
    expected = F.cross_entropy(ref.logits, batch.targets.data, reduction="sum")
    torch.testing.assert_close(out.nll_sum, expected, atol=1e-5, rtol=0)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # evaluation: scored in chunks, no logits kept
        evaluated = model(batch, need_logits=False, need_state=False)
    assert evaluated.logits is None
    torch.testing.assert_close(evaluated.nll_sum, ref.nll_sum, atol=1e-5, rtol=0)
    h, t = torch.randn(13, 16), torch.randint(0, V, (13,))  # chunks of 5, 5, 3
    with torch.no_grad():
        torch.testing.assert_close(model._nll(h, None, t, chunk=5), F.cross_entropy(model.head(h), t, reduction="none"))


def test_fused_loss_refuses_a_second_derivative():
    """Its backward returns gradients computed in the forward pass, constants to autograd,
    so differentiating them again must raise instead of coming out silently incomplete."""
    h = torch.randn(7, 5, requires_grad=True)
    w, b = torch.randn(11, 5, requires_grad=True), torch.zeros(11, requires_grad=True)
    t = torch.randint(0, 11, (7,))
    loss = linear_cross_entropy_sum(h, w, b, t, chunk=3)
    torch.testing.assert_close(loss, F.cross_entropy(h @ w.t() + b, t, reduction="sum"))
    scale = torch.tensor(2.0, requires_grad=True)  # makes the incoming gradient differentiable
    (grad_h,) = torch.autograd.grad(loss * scale, h, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_h.sum().backward()


def test_fused_loss_in_bf16_matches_the_fp32_loss_on_bf16_operands():
    """dtype=bf16: logits from bf16-rounded h, weight and bias, softmax computed in fp32 and
    rounded to bf16, p - 1 at the target before rounding; the bias gradient comes out of the
    weight-gradient GEMM (a column of ones). Reference: the same rounding done by hand."""
    torch.manual_seed(0)
    n, hid, v = 23, 16, 70  # chunks of 10, 10, 3
    h, w, b = torch.randn(n, hid), torch.randn(v, hid) * 0.5, torch.randn(v)
    t = torch.randint(0, v, (n,))
    bf = torch.bfloat16
    z = (h.to(bf).float() @ w.to(bf).float().t() + b.to(bf).float()).to(bf).float()
    p = torch.softmax(z, 1)
    nll = -p[torch.arange(n), t].to(bf).float().log().sum()
    g = p.clone()
    g[torch.arange(n), t] -= 1
    g = g.to(bf).float()
    ref = (nll, g @ w.to(bf).float(), g.t() @ h.to(bf).float(), g.sum(0))

    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    loss = linear_cross_entropy_sum(hh, ww, bb, t, chunk=10, dtype=bf)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref[0], rtol=1e-3, atol=0)
    for got, want in zip((hh.grad, ww.grad, bb.grad), ref[1:]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    fp32 = F.cross_entropy(h @ w.t() + b, t, reduction="sum")  # bf16's cost: <= 0.02 nats per token here
    assert abs(loss.item() - fp32.item()) / n < 0.02


def test_cpu_scoring_reuses_one_block_per_dtype_and_matches_cross_entropy(monkeypatch):
    """Evaluation (no grad, CPU) scores chunks in a block kept across calls: no (c, V)
    allocation per chunk; the fused training loss uses the same block. bf16: logits from
    bf16 operands rounded to bf16, log-softmax in fp32, as cross_entropy(logits.float())."""
    from lm import losses

    monkeypatch.setattr(losses, "_BLOCKS", {})  # not the blocks earlier tests left behind
    torch.manual_seed(0)
    h, w, b = torch.randn(23, 16), torch.randn(70, 16) * 0.5, torch.randn(70)
    t = torch.randint(0, 70, (23,))
    want = F.cross_entropy(h @ w.t() + b, t, reduction="none")
    got = losses.chunked_nll(h, w, b, t, chunk=10)
    torch.testing.assert_close(got, want)
    first = losses._BLOCKS[(torch.device("cpu"), torch.float32)]
    assert first.numel() == 10 * 70  # the largest chunk's size
    torch.testing.assert_close(losses.chunked_nll(h, w, b, t, chunk=10), want)
    linear_cross_entropy_sum(h, w, b, t, chunk=10)
    assert losses._BLOCKS[(torch.device("cpu"), torch.float32)] is first  # reused, not reallocated
    bf = torch.bfloat16
    with torch.autocast("cpu", dtype=bf):
        logits = F.linear(h, w, b)
    assert logits.dtype == bf
    torch.testing.assert_close(losses.chunked_nll(h, w, b, t, chunk=10, dtype=bf),
                               F.cross_entropy(logits.float(), t, reduction="none"))
    big = losses.block(30, 70, torch.float32, torch.device("cpu"))  # a larger request replaces the block
    assert big.shape == (30, 70) and losses._BLOCKS[(torch.device("cpu"), torch.float32)].numel() == 30 * 70


@pytest.mark.parametrize("cell", CELLS)
def test_loss_is_mean_over_real_target_tokens(cell):
    model = make_model(cell).eval()
    batch = make_batch(SEQS)
    out = model(batch)
    logits = unpack(out.logits, batch)  # (L, B, V)
    manual, count = 0.0, 0
    for b, s in enumerate(SEQS):
        for t, target in enumerate(s[1:]):
            manual -= torch.log_softmax(logits[t, b].double(), -1)[target].item()
            count += 1
    assert out.num_tokens == count == sum(len(s) - 1 for s in SEQS)
    assert out.nll_sum.item() == pytest.approx(manual, rel=1e-6)
    assert torch.equal(out.loss, out.nll_sum / out.num_tokens)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, batch.targets.data).item(), rel=1e-6)
    # Token-weighted: the batch loss is the token-weighted mean of per-sequence losses,
    # not the mean of per-sequence means (they differ here since lengths differ).
    singles = [model(make_batch([s])) for s in SEQS]
    weighted = sum(o.nll_sum.item() for o in singles) / sum(o.num_tokens for o in singles)
    per_seq = sum(o.loss.item() for o in singles) / len(singles)
    assert out.loss.item() == pytest.approx(weighted, rel=1e-5)
    assert abs(out.loss.item() - per_seq) > 1e-4


@pytest.mark.parametrize("cell", CELLS)
def test_step_loop_at_full_teacher_forcing_equals_fused(cell):
    model = make_model(cell).eval()
    batch = make_batch(SEQS)
    fused = model(batch)
    stepped = model(batch, stepwise=True)
    torch.testing.assert_close(stepped.logits, fused.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped.nll_sum, fused.nll_sum, atol=1e-5, rtol=0)
    assert len(stepped.state) == len(fused.state)
    for a, b in zip(stepped.state, fused.state):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_step_loop_equals_fused_with_adaptive_softmax():
    model = make_model("lstm", adaptive_cutoffs=[8, 16]).eval()
    batch = make_batch(SEQS)
    fused, stepped = model(batch), model(batch, stepwise=True)
    assert fused.logits is None and stepped.logits is None
    torch.testing.assert_close(stepped.nll_sum, fused.nll_sum, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_locked_dropout_same_masks_in_both_paths(cell):
    model = make_model(cell, dropout_emb=0.3, dropout_out=0.3, locked_dropout=True).train()
    batch = make_batch(SEQS)
    torch.manual_seed(7)
    fused = model(batch)
    torch.manual_seed(7)
    stepped = model(batch, stepwise=True)
    torch.testing.assert_close(stepped.logits, fused.logits, atol=1e-5, rtol=0)
    model.eval()
    assert not torch.allclose(model(batch).logits, fused.logits)  # dropout did act


@pytest.mark.parametrize("locked", [True, False])
def test_locked_output_dropout_is_one_mask_per_sequence(locked):
    model = make_model("gru", hidden_size=32, embed_dim=32, dropout_out=0.5, locked_dropout=locked)
    batch = make_batch(SEQS)
    seen = []
    model.head.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    model.eval()
    model(batch)
    model.train()
    torch.manual_seed(3)
    model(batch)
    clean, dropped = seen  # (N, H) each; dropped = clean * mask, mask in {0, 2}
    mask = torch.where(dropped == 0, 0.0, 2.0)
    torch.testing.assert_close(dropped, clean * mask)
    rows = _sequence_rows(batch.inputs.batch_sizes)  # (N,) sorted row of each token
    first = mask[: int(batch.inputs.batch_sizes[0])]  # step 0 holds every sequence once
    assert torch.equal(mask, first[rows]) == locked


@pytest.mark.parametrize("cell", CELLS)
def test_free_running_feeds_previous_argmax(cell):
    model = make_model(cell).eval()
    batch = make_batch(SEQS)
    out = model(batch, teacher_forcing=0.0)
    got = unpack(out.logits, batch)  # (L, B, V)
    manual = 0.0
    for b, s in enumerate(SEQS):
        state, token = model.init_state(1), torch.tensor([s[0]])  # the notebook's loop
        for t, target in enumerate(s[1:]):
            logits, state = model.step(token, state)  # (1, V)
            torch.testing.assert_close(got[t, b], logits[0], atol=1e-5, rtol=0)
            manual += F.cross_entropy(logits, torch.tensor([target]), reduction="sum").item()
            token = logits.argmax(-1)
    assert out.nll_sum.item() == pytest.approx(manual, rel=1e-5)
    assert not torch.allclose(out.logits, model(batch).logits)  # it did not read the truth


@pytest.mark.parametrize("cell", CELLS)
def test_scheduled_sampling_mixes_truth_and_predictions_by_coin(cell):
    model = make_model(cell).eval()
    batch = make_batch(SEQS)
    out = model(batch, teacher_forcing=0.5, generator=torch.Generator().manual_seed(11))
    again = model(batch, teacher_forcing=0.5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(out.logits, again.logits)
    # The documented coins: one torch.rand(N) in packed order; packed index of
    # (sorted row j, step t) is offsets[t] + j.
    coins = torch.rand(out.num_tokens, generator=torch.Generator().manual_seed(11)) < 0.5
    sizes = batch.inputs.batch_sizes
    offsets = torch.cumsum(sizes, 0) - sizes
    row = {int(i): j for j, i in enumerate(batch.inputs.sorted_indices)}
    got = unpack(out.logits, batch)
    fed_prediction = 0
    for b, s in enumerate(SEQS):
        state, token = model.init_state(1), torch.tensor([s[0]])
        for t in range(len(s) - 1):
            if t > 0:
                truth = coins[offsets[t] + row[b]]
                fed_prediction += int(not truth and token.item() != s[t])
                token = torch.tensor([s[t]]) if truth else token
            logits, state = model.step(token, state)
            torch.testing.assert_close(got[t, b], logits[0], atol=1e-5, rtol=0)
            token = logits.argmax(-1)
    assert fed_prediction > 0  # the test is not vacuous


def test_sampled_feedback_is_reproducible_with_generator():
    model = make_model("lstm").eval()
    batch = make_batch(SEQS)
    runs = [
        model(batch, teacher_forcing=0.0, sample=True, generator=torch.Generator().manual_seed(s)).logits
        for s in (5, 5, 6)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("stepwise", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_carried_state_continues_sequences(cell, stepwise):
    """Two chunks with the first chunk's state == one pass (state in the caller's order)."""
    model = make_model(cell).eval()
    seqs = [s if len(s) > 2 else s + [4] for s in SEQS]  # both chunks need an input token
    cuts = [3, 1, 6, 1, 2]  # first chunk s[: c + 1], second s[c:]: chunk inputs tile s[:-1]
    whole = make_batch(seqs)
    first = make_batch([s[: c + 1] for s, c in zip(seqs, cuts)])
    second = make_batch([s[c:] for s, c in zip(seqs, cuts)])
    a = model(first, stepwise=stepwise)
    b = model(second, st.detach(a.state), stepwise=stepwise)
    full = unpack(model(whole).logits, whole)
    la, lb = unpack(a.logits, first), unpack(b.logits, second)
    for i, (s, c) in enumerate(zip(seqs, cuts)):
        torch.testing.assert_close(la[:c, i], full[:c, i], atol=1e-5, rtol=0)
        torch.testing.assert_close(lb[: len(s) - 1 - c, i], full[c : len(s) - 1, i], atol=1e-5, rtol=0)
    assert a.nll_sum.item() + b.nll_sum.item() == pytest.approx(model(whole).nll_sum.item(), rel=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_state_interface(cell):
    model = make_model(cell)
    arity = 2 if cell == "lstm" else 1
    state = model.init_state(5)
    assert len(state) == arity
    assert all(s.shape == (2, 5, 16) and not s.any() for s in state)
    full = tuple(torch.randn(2, 5, 16) for _ in range(arity))
    assert st.hidden(full) is full[0]
    assert st.from_torch(st.to_torch(full)) == full
    assert all(torch.equal(a, b[:, [4, 0]]) for a, b in zip(st.select(full, torch.tensor([4, 0])), full))
    assert all(torch.equal(a, b[:, :3]) for a, b in zip(st.narrow(full, 3), full))
    rebuilt = st.cat([st.narrow(full, 2), st.narrow(full, 3, start=2)])
    assert all(torch.equal(a, b) for a, b in zip(rebuilt, full))
    grad = tuple(s.requires_grad_() * 2 for s in full)
    assert all(not s.requires_grad for s in st.detach(grad))
    # The torch module accepts the converted zero state and gives what no state gives.
    batch = make_batch(SEQS)
    model.eval()
    zero = model(batch, model.init_state(len(SEQS)))
    none = model(batch)
    assert torch.equal(zero.logits, none.logits)
    assert len(none.state) == arity and none.state[0].shape == (2, len(SEQS), 16)


def _tiny_corpus(n: int, gen: torch.Generator) -> list[list[int]]:
    return [[1] + torch.randint(3, V, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist() + [2] for _ in range(n)]


@pytest.mark.parametrize("cell", CELLS)
def test_loss_falls_with_adam(cell):
    model = make_model(cell).train()
    batch = make_batch(_tiny_corpus(8, torch.Generator().manual_seed(0)))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(40):
        out = model(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(V))).item(), abs=0.1)  # uniform at init
    assert all(b < a for a, b in zip(losses[:10], losses[1:10]))  # falls from the first steps
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_learns_deterministic_toy_language(cell):
    """Each sequence starts at letter s (playing <bos>: it is never a target), walks the
    cycle s, s+1, ... through all K letters and ends with <eos>. Every target is then
    determined, but knowing when to stop needs the RNN to remember s for K steps."""
    K, eos = 6, 0
    letters = list(range(1, K + 1))
    seqs = [[letters[(s + i) % K] for i in range(K)] + [eos] for s in range(K)]
    torch.manual_seed(0)
    model = RNNLM(K + 1, cell=cell, embed_dim=16, hidden_size=32, num_layers=1, pad_id=None)
    batch = make_batch(seqs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(300):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert model(batch).loss.item() < 0.05
    assert torch.equal(model(batch).logits.argmax(-1), batch.targets.data)


def test_tied_weights_share_one_parameter():
    tied = make_model("lstm", tie_weights=True)
    untied = make_model("lstm")
    assert tied.head.weight is tied.embed.weight
    assert tied.num_parameters() == untied.num_parameters() - V * 16
    tied(make_batch(SEQS)).loss.backward()
    assert tied.embed.weight.grad is not None and tied.head.weight.grad is tied.embed.weight.grad


def test_tied_weights_size_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"embed_dim=12.*hidden_size=20"):
        RNNLM(V, embed_dim=12, hidden_size=20, tie_weights=True)


def test_tying_with_adaptive_softmax_is_refused():
    with pytest.raises(ValueError, match="adaptive"):
        RNNLM(V, embed_dim=16, hidden_size=16, tie_weights=True, adaptive_cutoffs=[8])


def test_bidirectional_language_model_is_refused():
    with pytest.raises(ValueError, match="RNNEncoder"):
        RNNLM(V, bidirectional=True)


def test_unknown_cell_lists_choices():
    with pytest.raises(ValueError, match=r"\['gru', 'lstm', 'rnn'\]"):
        RNNLM(V, cell="transformer")


def test_adaptive_softmax_nll_matches_its_log_prob():
    model = make_model("gru", adaptive_cutoffs=[8, 16]).eval()
    batch = make_batch(SEQS)
    out = model(batch)
    assert out.logits is None
    packed_emb = batch.inputs._replace(data=model.embed(batch.inputs.data))
    h = model.rnn(packed_emb)[0].data  # (N, H)
    log_prob = model.head.log_prob(h)  # (N, V)
    torch.testing.assert_close(log_prob.exp().sum(-1), torch.ones(out.num_tokens))
    manual = -log_prob.gather(1, batch.targets.data[:, None]).sum()
    torch.testing.assert_close(out.nll_sum, manual, atol=1e-5, rtol=0)
    assert torch.equal(out.loss, out.nll_sum / out.num_tokens)
    scores, _ = model.step(torch.tensor([1, 4]))
    torch.testing.assert_close(scores.exp().sum(-1), torch.ones(2))  # step gives log-probs


# -- encoder ----------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [False, True])
def test_bidirectional_gru_encoder_final_states(batch_first):
    torch.manual_seed(0)
    enc = RNNEncoder(V, cell="gru", embed_dim=8, hidden_size=6, num_layers=2, batch_first=batch_first).eval()
    batch = make_batch(SEQS)
    out = enc(batch)
    B, L, H = len(SEQS), max(len(s) for s in SEQS) - 1, 6
    assert out.outputs.shape == ((B, L, 2 * H) if batch_first else (L, B, 2 * H))
    assert out.lengths.tolist() == [len(s) - 1 for s in SEQS]
    (h_n,) = out.state
    assert h_n.shape == (2 * 2, B, H)
    outputs = out.outputs.transpose(0, 1) if batch_first else out.outputs  # (L, B, 2H)
    # Reference: a plain nn.GRU with the same weights on each sequence alone, unpadded, so
    # its backward direction starts at the sequence's own last token.
    gru = torch.nn.GRU(8, H, num_layers=2, bidirectional=True)
    gru.load_state_dict(enc.rnn.state_dict())
    for b, s in enumerate(SEQS):
        n = len(s) - 1
        ref_out, ref_h = gru(enc.embed(torch.tensor(s[:-1]))[:, None])  # (n, 1, 2H), (4, 1, H)
        torch.testing.assert_close(outputs[:n, b], ref_out[:, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(h_n[:, b], ref_h[:, 0], atol=1e-6, rtol=0)
    (layers,) = enc.by_layer(out.state)  # (num_layers, 2, B, H)
    for b, n in enumerate(out.lengths.tolist()):
        assert torch.equal(layers[-1, 0, b], outputs[n - 1, b, :H])  # forward: last real step
        assert torch.equal(layers[-1, 1, b], outputs[0, b, H:])  # backward: step 0
        assert not outputs[n:, b].any()


def test_bidirectional_lstm_encoder_cell_state_per_sequence():
    torch.manual_seed(0)
    enc = RNNEncoder(V, cell="lstm", embed_dim=8, hidden_size=6, num_layers=2).eval()
    batch = make_batch(SEQS)
    out = enc(batch)
    h_n, c_n = out.state
    assert h_n.shape == c_n.shape == (4, len(SEQS), 6)
    h, c = enc.by_layer(out.state)
    for b, n in enumerate(out.lengths.tolist()):
        assert torch.equal(h[-1, 0, b], out.outputs[n - 1, b, :6])
        assert torch.equal(h[-1, 1, b], out.outputs[0, b, 6:])
        # Each sequence's (h_n, c_n) column is what it gets encoded alone: caller's order kept.
        alone = enc(make_batch([SEQS[b]])).state
        for full, single in zip(out.state, alone):
            torch.testing.assert_close(full[:, b], single[:, 0], atol=1e-6, rtol=0)


def test_init_range_sets_every_parameter_uniformly_as_zaremba_et_al():
    from lm.config import ModelConfig
    from lm.model import build_model

    torch.manual_seed(0)
    m = build_model(ModelConfig(cell="lstm", embed_dim=32, hidden_size=32, num_layers=2, init_range=0.05), 50)
    for name, p in m.named_parameters():
        assert p.abs().max() <= 0.05, name
        if p.numel() > 1000:  # uniform, not torch's +-1/sqrt(H) = 0.177 nor zero biases
            assert p.abs().max() > 0.049 and abs(p.mean()) < 0.005, name
    assert torch.equal(m.embed.weight[0], torch.zeros(32))
    assert m.rnn.bias_ih_l0.abs().min() > 0  # biases too (torch and pytorch/examples leave them otherwise)
