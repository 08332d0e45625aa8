"""generate(): packed prefill + batched steps == the one-prompt-at-a-time notebook loop;
stopping at <eos> and max_new_tokens; sampling options; banned ids."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pad_packed_sequence

from lm.decode import generate
from lm.model import RNNLM

V = 17
PROMPTS = [[1, 5, 7], [2], [3, 4, 5, 6, 8, 9, 10], [9, 9]]


def make_model(cell: str, seed: int = 0, **kw) -> RNNLM:
    """A random model with N(0, 1) weights: a freshly initialised one is near-uniform and
    repeats one token, which would make the comparisons below weak."""
    torch.manual_seed(seed)
    model = RNNLM(V, cell=cell, embed_dim=12, hidden_size=12, num_layers=2, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0)
    return model


@torch.no_grad()
def reference(model: RNNLM, prompt: list[int], max_new_tokens: int, eos_id: int, banned: tuple = ()) -> list[int]:
    """The notebook's loop: one prompt, token by token from a zero state, greedy (the best
    id not in ``banned``)."""
    model.eval()
    state = model.init_state(1)
    for tok in prompt:
        scores, state = model.step(torch.tensor([tok]), state)
    new = []
    for _ in range(max_new_tokens):
        tok = max((i for i in range(scores.size(-1)) if i not in banned), key=lambda i: float(scores[0, i]))
        if tok == eos_id:
            break
        new.append(tok)
        scores, state = model.step(torch.tensor([tok]), state)
    return new


def successor_model(num_tokens: int = 8) -> RNNLM:
    """A hand-set Elman RNN whose greedy next token is always ``input + 1``, so from
    token ``x`` it emits ``x+1, ..., num_tokens - 1`` (the last id is ``<eos>``)."""
    model = RNNLM(num_tokens, cell="rnn", embed_dim=num_tokens, hidden_size=num_tokens, num_layers=1, pad_id=None)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight.copy_(5 * torch.eye(num_tokens))  # one-hot inputs
        model.rnn.weight_ih_l0.copy_(torch.eye(num_tokens))  # h = tanh(5 * onehot(x)); no recurrence
        succ = torch.arange(num_tokens).add(1).clamp(max=num_tokens - 1)
        model.head.weight[succ, torch.arange(num_tokens)] = 10.0
    return model


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_greedy_equals_one_prompt_reference_loop(cell):
    model = make_model(cell)
    free = generate(model, PROMPTS, max_new_tokens=12, eos_id=-1)  # never stops early
    assert free == [reference(model, p, 12, -1) for p in PROMPTS]
    assert all(len(g) == 12 for g in free)
    # Stop the first prompt mid-way: <eos> := the first token it emits for the first time after step 0.
    k = next(k for k in range(1, 12) if free[0][k] not in free[0][:k])
    eos = free[0][k]
    got = generate(model, PROMPTS, max_new_tokens=12, eos_id=eos)
    assert got == [reference(model, p, 12, eos) for p in PROMPTS]
    assert got[0] == free[0][:k] and all(eos not in g for g in got)


def test_greedy_equals_reference_with_adaptive_softmax():
    model = make_model("lstm", adaptive_cutoffs=[6])
    got = generate(model, PROMPTS, max_new_tokens=10, eos_id=3)
    assert got == [reference(model, p, 10, 3) for p in PROMPTS]
    assert sorted(len(g) for g in got) == [0, 1, 4, 10]


def test_stops_at_eos_and_finished_sequences_leave_the_batch():
    model = successor_model(8)  # eos = 7
    sizes = []
    step = model.step
    model.step = lambda tokens, state: (sizes.append(tokens.numel()), step(tokens, state))[1]
    got = generate(model, [[0], [2], [4, 5], [3, 6]], max_new_tokens=20, eos_id=7)
    assert got == [[1, 2, 3, 4, 5, 6], [3, 4, 5, 6], [6], []]
    # After pick n, only sequences that have not emitted eos are stepped.
    assert sizes == [3, 2, 2, 2, 1, 1]


def test_max_new_tokens_respected():
    model = successor_model(8)
    assert generate(model, [[0], [5], [1, 2]], max_new_tokens=3, eos_id=7) == [[1, 2, 3], [6], [3, 4, 5]]
    assert generate(model, [[0], [5]], max_new_tokens=0, eos_id=7) == [[], []]
    random = make_model("gru")
    assert all(len(g) == 5 for g in generate(random, PROMPTS, max_new_tokens=5, eos_id=-1))


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_top_k_one_sampling_equals_greedy(cell):
    model = make_model(cell)
    greedy = generate(model, PROMPTS, max_new_tokens=10, eos_id=3)
    sampled = generate(
        model, PROMPTS, max_new_tokens=10, eos_id=3, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0)
    )
    assert sampled == greedy


def test_temperature_sampling_is_reproducible_with_seeded_generator():
    model = make_model("lstm")

    def run(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return generate(model, PROMPTS, max_new_tokens=15, eos_id=3, temperature=2.0, generator=gen)

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_top_k_samples_only_among_the_k_best():
    model = make_model("gru").eval()
    got = generate(
        model, PROMPTS, max_new_tokens=15, eos_id=-1, temperature=5.0, top_k=2, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        for prompt, new in zip(PROMPTS, got):
            state = model.init_state(1)
            for tok in prompt:
                scores, state = model.step(torch.tensor([tok]), state)
            for tok in new:  # replay the sampled continuation and check each pick
                assert tok in scores[0].topk(2).indices.tolist()
                scores, state = model.step(torch.tensor([tok]), state)
    assert got != generate(model, PROMPTS, max_new_tokens=15, eos_id=-1)  # it did sample


def test_prompts_must_be_non_empty_and_mode_is_restored():
    model = make_model("gru").train()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=3, eos_id=2)
    assert generate(model, [], max_new_tokens=3, eos_id=2) == []
    generate(model, [[1]], max_new_tokens=3, eos_id=2)
    assert model.training


class TableLM(nn.Module):
    """A fake language model whose scores depend only on the last token: ``table[last]``.

    It has what ``generate`` uses (``embed``, ``prefill``, ``step``); its state ``(1, B, 1)``
    is unused but has the batch dimension a real state has."""

    def __init__(self, table: list[list[float]]):
        super().__init__()
        self.table = torch.tensor(table)  # (V, V)
        self.embed = nn.Embedding(len(table), 1)

    def prefill(self, packed, state=None):
        padded, lengths = pad_packed_sequence(packed)  # (T, B), caller's order
        last = padded[lengths - 1, torch.arange(len(lengths))]  # (B,)
        return self.table[last], (last.view(1, -1, 1).float(),)

    def step(self, tokens, state):
        return self.table[tokens], (tokens.view(1, -1, 1).float(),)


# From token t the scores rank the ids as written; id 3 plays <unk>, id 2 <eos>.
#          0     1     2     3     4     5
TABLE = [[0.0, -9.0, -5.0, 9.0, 1.0, 2.0],  # 0: <unk> > 5 > 4 > 0 > <eos>
         [0.0, -9.0, -5.0, 9.0, 8.0, 1.0],  # 1: <unk> > 4 > 5
         [0.0, -9.0, -5.0, 0.0, 0.0, 0.0],
         [0.0, -9.0, 7.0, 9.0, -1.0, 1.0],  # 3: <unk> > <eos> > 5
         [0.0, -9.0, 3.0, 9.0, 1.0, 5.0],  # 4: <unk> > 5 > <eos>
         [0.0, -9.0, 6.0, 5.0, 1.0, 0.5]]  # 5: <eos> > <unk> > 4


def test_banned_ids_greedy_takes_the_best_allowed_token():
    model = TableLM(TABLE)
    assert generate(model, [[1], [4]], max_new_tokens=4, eos_id=2) == [[3, 3, 3, 3], [3, 3, 3, 3]]
    # <unk> banned: 1 -> 4 -> 5 -> <eos>;  4 -> 5 -> <eos>
    assert generate(model, [[1], [4]], max_new_tokens=4, eos_id=2, banned_ids=[3]) == [[4, 5], [5]]
    # <eos> banned too: every sequence runs to max_new_tokens
    assert generate(model, [[0]], max_new_tokens=5, eos_id=2, banned_ids=[2, 3, 0]) == [[5, 4, 5, 4, 5]]
    # a banned id that is never the best changes nothing
    assert generate(model, [[1], [4]], max_new_tokens=4, eos_id=2, banned_ids=[1]) == [[3, 3, 3, 3], [3, 3, 3, 3]]


def test_banned_ids_are_never_sampled():
    model = TableLM(TABLE)
    gen = torch.Generator().manual_seed(0)
    got = generate(model, [[0]] * 20, max_new_tokens=10, eos_id=-1, temperature=50.0, banned_ids=[3, 0],
                   generator=gen)
    drawn = {t for g in got for t in g}
    assert drawn == {1, 2, 4, 5}  # a high temperature draws every allowed id, and no banned one
    # top-k counts allowed ids only: the 2 best allowed after 0 are 5 and 4
    got = generate(model, [[0]] * 20, max_new_tokens=1, eos_id=-1, temperature=1.0, top_k=2, banned_ids=[3],
                   generator=gen)
    assert {g[0] for g in got} == {4, 5}


@pytest.mark.parametrize("cutoffs", [None, [6]])
def test_banned_ids_on_a_real_model_equal_the_masked_reference(cutoffs):
    model = make_model("lstm", adaptive_cutoffs=cutoffs)
    free = generate(model, PROMPTS, max_new_tokens=8, eos_id=-1)
    banned = tuple(sorted({g[0] for g in free}))  # every prompt's first pick is banned
    got = generate(model, PROMPTS, max_new_tokens=8, eos_id=-1, banned_ids=banned)
    assert got == [reference(model, p, 8, -1, banned) for p in PROMPTS]
    assert not {t for g in got for t in g} & set(banned)


def test_banned_ids_are_checked():
    model = TableLM(TABLE)
    with pytest.raises(ValueError, match=r"ids in \[0, 6\)"):
        generate(model, [[1]], max_new_tokens=2, eos_id=2, banned_ids=[6])
    with pytest.raises(ValueError, match="bans every token"):
        generate(model, [[1]], max_new_tokens=2, eos_id=2, banned_ids=range(6))
