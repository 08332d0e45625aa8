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


# --------------------------------------------------------------------------- text in, text out (lm.generate)

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "cat", "sat"]
# Scores after each token: from <bos> and from "cat" the best is <unk>; without <unk>,
# <bos> -> cat -> sat -> <eos>.
#               <pad> <bos> <eos> <unk>  cat   sat
WORD_TABLE = [[0.0, -9.0, 0.0, 0.0, 0.0, 0.0],  # <pad> (never fed)
              [-5.0, -9.0, -3.0, 4.0, 3.0, 1.0],  # <bos>: <unk> > cat
              [0.0, -9.0, 0.0, 0.0, 0.0, 0.0],  # <eos> (never fed)
              [-5.0, -9.0, -3.0, 2.0, 4.0, 1.0],  # <unk>: cat > <unk>
              [-5.0, -9.0, 1.0, 4.0, -1.0, 3.0],  # cat: <unk> > sat > <eos>
              [-5.0, -9.0, 4.0, 3.0, 1.0, -1.0]]  # sat: <eos> > <unk> > cat


def table_rnnlm(table: list[list[float]]) -> RNNLM:
    """A real one-layer Elman ``RNNLM`` with fixed weights whose scores after token ``x`` are
    ``table[x]`` up to a factor tanh(5) (one-hot hidden state, no recurrence)."""
    v = len(table)
    model = RNNLM(v, cell="rnn", embed_dim=v, hidden_size=v, num_layers=1,
                  dropout_emb=0.0, dropout_rnn=0.0, dropout_out=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.weight.copy_(5 * torch.eye(v))  # h = tanh(5 * onehot(x))
        model.rnn.weight_ih_l0.copy_(torch.eye(v))
        model.head.weight.copy_(torch.tensor(table).T)  # logits = table[x] * tanh(5)
    return model.eval()


def word_tokenizer_json(words: list[str]) -> str:
    """A whitespace word tokenizer with the toolkit's special tokens, as pipeline.prepare builds one."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in words[:4]])
    return tok.to_str()


SPECIAL_IDS = {"pad": 0, "bos": 1, "eos": 2, "unk": 3}


def test_complete_shows_unk_and_no_unk_takes_the_best_word(capsys):
    from lm.generate import complete

    model, tok = table_rnnlm(WORD_TABLE), word_tokenizer_json(WORDS)
    prompts = ["cat", "", "sat"]
    got = complete(model, tok, SPECIAL_IDS, prompts, max_new_tokens=4)
    # generated <unk> are shown, not dropped; "" starts from <bos>; sat -> <eos> at once
    assert got == ["cat <unk> cat <unk> cat", "<unk> cat <unk> cat", "sat"]
    got = complete(model, tok, SPECIAL_IDS, prompts, max_new_tokens=4, banned_ids=[3])
    assert got == ["cat sat", "cat sat", "sat"]
    got = complete(model, tok, SPECIAL_IDS, ["sat"], max_new_tokens=3, banned_ids=[2, 3])  # no <eos> either
    assert got == ["sat cat sat cat"]
    assert capsys.readouterr().err == ""  # every prompt word was known


def test_complete_reads_unknown_prompt_words_as_unk_and_names_them(capsys):
    from lm.generate import complete

    model, tok = table_rnnlm(WORD_TABLE), word_tokenizer_json(WORDS)
    got = complete(model, tok, SPECIAL_IDS, ["The cat", "a dog  sat a <unk>"], max_new_tokens=2, banned_ids=[3])
    # the prompt as the model read it (a literal <unk> is the token, no warning), then 2 new words
    assert got == ["<unk> cat sat", "<unk> <unk> sat <unk> <unk> cat sat"]
    assert capsys.readouterr().err.splitlines() == [
        "warning: prompt 'The cat': not in the vocabulary, read as <unk>: The",
        "warning: prompt 'a dog  sat a <unk>': not in the vocabulary, read as <unk>: a, dog",
    ]
    complete(model, tok, SPECIAL_IDS, ["The cat"], max_new_tokens=1, warn=False)
    assert capsys.readouterr().err == ""


@pytest.fixture
def table_checkpoint(tmp_path):
    """A checkpoint of ``table_rnnlm(WORD_TABLE)`` with its word tokenizer, as lm.train writes one."""
    from lm import checkpoint

    model = {"cell": "rnn", "embed_dim": 6, "hidden_size": 6, "num_layers": 1,
             "dropout_emb": 0.0, "dropout_rnn": 0.0, "dropout_out": 0.0}
    path = tmp_path / "table.pt"
    checkpoint.save({"recipe": {"model": model}, "vocab_size": 6, "model": table_rnnlm(WORD_TABLE).state_dict(),
                     "tokenizer": word_tokenizer_json(WORDS), "special_ids": SPECIAL_IDS}, path)
    return str(path)


def run_generate(capsys, *args: str) -> tuple[list[str], list[str]]:
    import lm.generate

    capsys.readouterr()
    assert lm.generate.main(list(args)) == 0
    out, err = capsys.readouterr()
    return out.splitlines(), err.splitlines()


def test_cli_shows_unk_and_bans_tokens(table_checkpoint, capsys):
    prompts = ["--prompt", "cat", "--prompt", "", "--prompt", "The cat", "--max-new-tokens", "4"]
    out, err = run_generate(capsys, table_checkpoint, *prompts)
    assert out == ["cat <unk> cat <unk> cat", "<unk> cat <unk> cat", "<unk> cat <unk> cat <unk> cat"]
    assert err == ["warning: prompt 'The cat': not in the vocabulary, read as <unk>: The"]
    for ban in (["--no-unk"], ["--ban", "<unk>"], ["--ban", "3"], ["--ban", "<pad>", "--ban", "<unk>", "1"]):
        out, _ = run_generate(capsys, table_checkpoint, *prompts, *ban)
        assert out == ["cat sat", "cat sat", "<unk> cat sat"], ban
    out, _ = run_generate(capsys, table_checkpoint, "--prompt", "sat", "--no-unk", "--ban", "<eos>",
                          "--max-new-tokens", "3")
    assert out == ["sat cat sat cat"]


def test_cli_top_k_alone_samples_at_temperature_one(table_checkpoint, capsys):
    base = [table_checkpoint, *["--prompt", "cat"] * 8, "--max-new-tokens", "6"]
    greedy, _ = run_generate(capsys, *base)
    assert run_generate(capsys, *base, "--top-k", "1")[0] == greedy  # the best token only: greedy
    sampled, _ = run_generate(capsys, *base, "--top-k", "3", "--seed", "1")
    assert sampled == run_generate(capsys, *base, "--top-k", "3", "--temperature", "1.0", "--seed", "1")[0]
    assert sampled != greedy


def test_cli_help_names_every_option_and_its_default(capsys):
    import lm.generate

    with pytest.raises(SystemExit) as e:
        lm.generate.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--prompt", "--max-new-tokens", "--temperature", "--top-k", "--seed", "--no-unk", "--ban",
                 "--device", "--debug"):
        assert flag in text
    assert "(default: 30)" in text and "(default: cpu)" in text and "(default: 0)" in text
    assert "an empty prompt starts from <bos>" in text
