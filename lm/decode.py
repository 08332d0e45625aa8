"""Batched greedy / sampled decoding for :class:`lm.model.RNNLM`.

Prompts of different lengths are prefilled as one packed batch; then every step feeds
each running sequence its last token through ``model.step``. A sequence that emits
``eos_id`` leaves the batch (its rows are dropped from the state with
:func:`lm.state.select`), so the batch only shrinks. Banned ids (e.g. ``<unk>``) get a
score of ``-inf`` before every pick, so greedy takes the best allowed token and sampling
never draws a banned one.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import pack_sequence

from lm import state as st
from lm.model import RNNLM


def _next_tokens(
    scores: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None, banned: Tensor | None
) -> Tensor:
    """Pick one token per row of ``scores`` ``(b, V)`` (logits or log-probs): ``(b,)``.

    ``banned`` ``(V,)`` bool marks ids that may not be picked.
    """
    if banned is not None:
        # -inf is the floor of logits and log-probs alike (full and adaptive softmax)
        scores = scores.masked_fill(banned, float("-inf"))  # (b, V)
    if temperature == 0.0:
        return scores.argmax(-1)
    scores = scores.float() / temperature  # (b, V)
    if top_k is not None and top_k < scores.size(-1):
        # a banned id can be among the k only when fewer than k are allowed: its weight is 0 anyway
        kth = scores.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(F.softmax(scores, -1), 1, generator=generator).squeeze(1)


def generate(
    model: RNNLM,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    banned_ids: Iterable[int] = (),
) -> list[list[int]]:
    """Continue each prompt until it emits ``eos_id`` or has ``max_new_tokens`` new tokens.

    Args:
        model: the language model; run in eval mode (restored afterwards) without grad.
        prompts: non-empty lists of token ids, any lengths (e.g. ``[bos, ...]``).
        max_new_tokens: most tokens generated per prompt, ``eos_id`` included.
        eos_id: end-of-sequence id; a sequence stops when it emits it.
        temperature: 0 picks the argmax (greedy); above 0 samples from
            ``softmax(scores / temperature)``.
        top_k: when sampling, only the ``top_k`` best tokens are candidates.
        generator: RNG for sampling, on the model's device.
        banned_ids: ids never generated (e.g. ``<unk>``); greedy picks the best allowed
            token. Banning ``eos_id`` makes every sequence run to ``max_new_tokens``.

    Returns:
        The new tokens of each prompt, in the prompts' order, without the prompt and
        without the final ``eos_id`` (a list shorter than ``max_new_tokens`` means the
        sequence ended with ``eos_id``).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. <bos>)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    banned_ids = sorted(set(banned_ids))
    vocab_size = model.embed.num_embeddings
    if any(not 0 <= i < vocab_size for i in banned_ids):
        raise ValueError(f"banned_ids must be ids in [0, {vocab_size}), got {banned_ids}")
    if len(banned_ids) == vocab_size:
        raise ValueError("banned_ids bans every token: nothing is left to generate")
    new_tokens: list[list[int]] = [[] for _ in prompts]
    if not prompts or max_new_tokens == 0:
        return new_tokens
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            device = model.embed.weight.device
            banned = None
            if banned_ids:
                banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)  # (V,)
                banned[banned_ids] = True
            packed = pack_sequence([torch.tensor(p, device=device) for p in prompts], enforce_sorted=False)
            scores, state = model.prefill(packed)  # (B, V), caller's order
            alive = torch.arange(len(prompts), device=device)  # (b,) prompt index of each row
            for n in range(max_new_tokens):
                tokens = _next_tokens(scores, temperature, top_k, generator, banned)  # (b,)
                for i, tok in zip(alive.tolist(), tokens.tolist()):
                    if tok != eos_id:
                        new_tokens[i].append(tok)
                keep = (tokens != eos_id).nonzero().squeeze(1)  # (b',)
                if keep.numel() == 0 or n == max_new_tokens - 1:
                    break
                if keep.numel() < tokens.numel():
                    alive, tokens, state = alive[keep], tokens[keep], st.select(state, keep)
                scores, state = model.step(tokens, state)  # (b', V)
    finally:
        model.train(was_training)
    return new_tokens
