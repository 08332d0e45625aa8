"""Recurrent language model over packed batches, and the recipe's ``model:`` section built into one.

Targets are shifted by the collator (``pipeline/collate.py``), never here: the model
embeds ``batch.inputs``, runs the RNN on the ``PackedSequence`` and scores
``batch.targets.data`` position by position. No compute is spent on padding, and the
loss is the mean NLL over real target tokens.

Packed data is time-major (all step-0 tokens, longest sequence first, then all step-1
tokens, ...), so per-token tensors below are ``(N, ...)`` with ``N`` = number of real
tokens, and a sequence's row in the sorted batch is its position within its time step.
States are in the caller's order at the API boundary (as ``nn.LSTM`` does for a packed
input) and in sorted order inside the step loop.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lm import state as st
from lm.config import ModelConfig
from lm.losses import linear_cross_entropy_sum
from lm.rnn import check_prob, make_rnn
from lm.state import State
from pipeline.collate import PackedBatch
from pipeline.errors import UserError

def _sequence_rows(batch_sizes: Tensor) -> Tensor:
    """Sorted-batch row of every packed token: ``[0..bs_0), [0..bs_1), ...`` as one (N,) tensor."""
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes  # (T,) offset of each time step
    return torch.arange(int(batch_sizes.sum())) - starts.repeat_interleave(batch_sizes)  # (N,)


def _to_sorted(state: State, packed: PackedSequence) -> State:
    return state if packed.sorted_indices is None else st.select(state, packed.sorted_indices)


def _to_caller(state: State, packed: PackedSequence) -> State:
    return state if packed.unsorted_indices is None else st.select(state, packed.unsorted_indices)


@dataclass
class LMOutput:
    """What :meth:`RNNLM.forward` returns.

    Attributes:
        loss: mean NLL over the batch's real target tokens (``nll_sum / num_tokens``).
        nll_sum: summed NLL, for perplexity over a whole split or for a trainer that
            normalises by the global token count under DDP.
        num_tokens: number of target tokens scored.
        logits: packed logits ``(N, V)`` aligned with ``batch.targets.data``; ``None``
            with the adaptive softmax, which never forms them.
        state: final state of every sequence (at its last real step), caller's order.
    """

    loss: Tensor
    nll_sum: Tensor
    num_tokens: int
    logits: Tensor | None
    state: State | None


class RNNLM(nn.Module):
    """Embedding → GRU | LSTM | RNN → softmax (full or adaptive) language model.

    Args:
        vocab_size: number of token ids.
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"`` (tanh).
        embed_dim: embedding size.
        hidden_size: RNN hidden size, also the output layer's input size.
        num_layers: stacked RNN layers.
        dropout_emb: dropout on the embeddings.
        dropout_rnn: dropout between RNN layers (torch's own, inside the fused kernel;
            torch warns if set with one layer, where it does nothing).
        dropout_out: dropout on the top RNN layer's outputs, before the output layer.
        locked_dropout: use one dropout mask per sequence, shared by all its time steps
            (variational dropout), for ``dropout_emb`` and ``dropout_out``. The
            between-layer dropout stays torch's per-step dropout: a locked mask there
            would need one RNN call per layer instead of one fused call.
        tie_weights: share the embedding matrix with the output layer; needs
            ``embed_dim == hidden_size``.
        adaptive_cutoffs: use ``nn.AdaptiveLogSoftmaxWithLoss`` with these cutoffs
            instead of a full softmax (for large vocabularies; cannot be tied).
        pad_id: the collator's padding id, given to ``nn.Embedding`` as
            ``padding_idx`` (its row starts at zero and gets no gradient); ``None`` if
            the vocabulary has no padding token. Packed batches never contain padding.
        bidirectional: refused; a language model must not see the future.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        cell: str = "lstm",
        embed_dim: int = 256,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout_emb: float = 0.0,
        dropout_rnn: float = 0.0,
        dropout_out: float = 0.0,
        locked_dropout: bool = False,
        tie_weights: bool = False,
        adaptive_cutoffs: list[int] | None = None,
        pad_id: int | None = 0,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        if bidirectional:
            raise ValueError(
                "RNNLM cannot be bidirectional: the backward direction reads the very tokens "
                "the model is asked to predict. Use RNNEncoder for a bidirectional encoder."
            )
        for name, p in [("dropout_emb", dropout_emb), ("dropout_rnn", dropout_rnn), ("dropout_out", dropout_out)]:
            check_prob(name, p)
        if adaptive_cutoffs is not None and tie_weights:
            raise ValueError("tie_weights is not supported with adaptive_cutoffs (adaptive softmax has no single output matrix)")
        if tie_weights and embed_dim != hidden_size:
            raise ValueError(
                f"tie_weights needs embed_dim == hidden_size (the output layer's input size), "
                f"got embed_dim={embed_dim} and hidden_size={hidden_size}"
            )
        self.vocab_size = vocab_size
        self.dropout_emb = dropout_emb
        self.dropout_out = dropout_out
        self.locked_dropout = locked_dropout
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.rnn = make_rnn(cell, embed_dim, hidden_size, num_layers, dropout_rnn, bidirectional=False)
        self.head: nn.Linear | nn.AdaptiveLogSoftmaxWithLoss
        if adaptive_cutoffs is not None:
            self.head = nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, list(adaptive_cutoffs))
        else:
            self.head = nn.Linear(hidden_size, vocab_size)
        self._init_weights(pad_id)
        if tie_weights:
            self.head.weight = self.embed.weight

    @property
    def adaptive(self) -> bool:
        """Whether the output layer is an adaptive softmax (no logits, log-probs instead)."""
        return isinstance(self.head, nn.AdaptiveLogSoftmaxWithLoss)

    def _init_weights(self, pad_id: int | None) -> None:
        # nn.Embedding's N(0, 1) is far too large for a softmax input; as pytorch/examples.
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        if pad_id is not None:
            with torch.no_grad():
                self.embed.weight[pad_id].zero_()
        if not self.adaptive:
            nn.init.uniform_(self.head.weight, -0.1, 0.1)
            nn.init.zeros_(self.head.bias)

    def num_parameters(self) -> int:
        """Number of parameters, a tied matrix counted once."""
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero state ``(h,)`` or ``(h, c)``, each ``(num_layers, B, H)``; see :mod:`lm.state`."""
        return st.init_state(self.rnn, batch_size, device=device)

    # -- pieces shared by the fused path, the step loop and decoding -------------------

    def _dropout(self, x: Tensor, p: float, mask: Tensor | None) -> Tensor:
        """``mask`` is a locked mask already gathered to ``x``'s rows; else plain dropout."""
        return x * mask if mask is not None else F.dropout(x, p, self.training)

    def _locked_masks(self, num_seqs: int, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """One (embedding, output) dropout mask row per sequence, in sorted order."""
        if not (self.training and self.locked_dropout):
            return None, None

        def mask(dim: int, p: float) -> Tensor | None:
            if p == 0.0:
                return None
            return like.new_empty(num_seqs, dim).bernoulli_(1.0 - p).div_(1.0 - p)  # (B, D)

        return mask(self.embed.embedding_dim, self.dropout_emb), mask(self.rnn.hidden_size, self.dropout_out)

    def _logits(self, h: Tensor) -> Tensor | None:
        """Full-softmax logits ``(n, V)``; ``None`` with the adaptive softmax."""
        return None if self.adaptive else self.head(h)

    def _scores(self, h: Tensor) -> Tensor:
        """Next-token scores ``(n, V)``: logits, or log-probs with the adaptive softmax."""
        return self.head.log_prob(h) if self.adaptive else self.head(h)

    def _nll(self, h: Tensor, logits: Tensor | None, targets: Tensor, chunk: int = 2048) -> Tensor:
        """Per-token NLL ``(n,)`` of ``targets`` given top-layer outputs ``h`` ``(n, H)``.

        Without ``logits`` (not wanted by the caller) the full softmax is scored ``chunk``
        tokens at a time, so evaluation never holds ``(n, V)`` logits.
        """
        if self.adaptive:
            return -self.head(h, targets).output
        if logits is None:
            return torch.cat([
                F.cross_entropy(self.head(h[s : s + chunk]).float(), targets[s : s + chunk], reduction="none")
                for s in range(0, h.size(0), chunk)
            ])
        return F.cross_entropy(logits.float(), targets, reduction="none")

    @torch.no_grad()
    def _predict(self, h: Tensor, logits: Tensor | None, sample: bool, generator: torch.Generator | None) -> Tensor:
        """The model's own next token ``(n,)``, fed back by scheduled sampling."""
        if not sample:
            return self.head.predict(h) if logits is None else logits.argmax(-1)
        scores = self._scores(h) if logits is None else logits
        return torch.multinomial(F.softmax(scores.float(), -1), 1, generator=generator).squeeze(1)

    def _step_hidden(
        self, tokens: Tensor, state: State, emb_mask: Tensor | None = None, out_mask: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """One time step for a batch of ``tokens`` ``(b,)``: top-layer output ``(b, H)``, new state."""
        x = self._dropout(self.embed(tokens), self.dropout_emb, emb_mask)  # (b, E)
        out, hx = self.rnn(x.unsqueeze(0), st.to_torch(state))  # (1, b, H)
        return self._dropout(out.squeeze(0), self.dropout_out, out_mask), st.from_torch(hx)  # (b, H)

    # -- training / evaluation ---------------------------------------------------------

    def forward(
        self,
        batch: PackedBatch,
        state: State | None = None,
        *,
        teacher_forcing: float = 1.0,
        sample: bool = False,
        generator: torch.Generator | None = None,
        stepwise: bool = False,
        need_state: bool = True,
        need_logits: bool = True,
    ) -> LMOutput:
        """Score ``batch.targets`` given ``batch.inputs``.

        With ``teacher_forcing == 1`` (and not ``stepwise``) the RNN runs as one fused
        call on the packed batch. Below 1 it steps through the batch's ``batch_sizes``
        (scheduled sampling): at every step after the first, each active sequence reads
        its ground-truth token with probability ``teacher_forcing`` (coins drawn as one
        ``torch.rand(N, generator=generator)`` in packed order), else the model's own
        prediction at the previous step (argmax, or a softmax sample if ``sample``;
        never differentiated through). Step 0 always reads the ground truth (``<bos>``).
        The loss is over the same packed targets either way. In training mode the two
        paths draw dropout from the same distributions (locked masks identically) but
        from different random streams; in eval mode they agree to float precision.

        Args:
            batch: a collated batch with ``targets`` (``shift=True``).
            state: initial state in the caller's order, e.g. the detached final state of
                the previous chunk of the same streams; ``None`` starts from zeros
                (independent sequences).
            teacher_forcing: probability of feeding the ground-truth token, in [0, 1].
            sample: feed back softmax samples instead of the argmax.
            generator: RNG for the coins and samples, on the model's device.
            stepwise: use the step loop even at ``teacher_forcing == 1`` (for checks).
            need_state: ``False`` when the final state will not be used (training on
                independent sequences); it lets a CPU run take the faster padded kernel
                (see :meth:`_forward_fused`) and returns ``state=None`` there.
            need_logits: ``False`` when only the loss is wanted: ``logits=None`` is
                returned and the full softmax is scored in chunks of tokens; training on
                a CPU fuses the output layer with the loss (:func:`lm.losses.linear_cross_entropy_sum`).

        Returns:
            :class:`LMOutput`; ``state`` is each sequence's state after its last real
            token, in the caller's order (``None`` only if ``need_state=False``).
        """
        if batch.targets is None:
            raise ValueError("batch has no targets; collate with shift=True to train or evaluate a language model")
        if not torch.equal(batch.targets.batch_sizes, batch.inputs.batch_sizes):
            raise ValueError("batch.inputs and batch.targets must be packed with the same batch_sizes")
        if not 0.0 <= teacher_forcing <= 1.0:
            raise ValueError(f"teacher_forcing must be in [0, 1], got {teacher_forcing}")
        inputs = batch.inputs
        masks = self._locked_masks(int(inputs.batch_sizes[0]), self.embed.weight)
        targets = batch.targets.data  # (N,)
        num_tokens = targets.numel()
        if teacher_forcing == 1.0 and not stepwise:
            fuse_loss = not need_logits and not self.adaptive and torch.is_grad_enabled() and targets.device.type == "cpu"
            h, logits, state = self._forward_fused(inputs, state, masks, need_state, logits=need_logits)
            if fuse_loss:
                nll_sum = linear_cross_entropy_sum(h.float(), self.head.weight, self.head.bias, targets)
                return LMOutput(loss=nll_sum / num_tokens, nll_sum=nll_sum, num_tokens=num_tokens, logits=None, state=state)
        else:
            h, logits, state = self._forward_stepwise(inputs, state, masks, teacher_forcing, sample, generator)
        nll_sum = self._nll(h, logits, targets).sum()
        return LMOutput(loss=nll_sum / num_tokens, nll_sum=nll_sum, num_tokens=num_tokens, logits=logits, state=state)

    def _forward_fused(
        self,
        inputs: PackedSequence,
        state: State | None,
        masks: tuple[Tensor | None, Tensor | None],
        need_state: bool = True,
        logits: bool = True,
    ) -> tuple[Tensor, Tensor | None, State | None]:
        """One RNN call over the whole batch.

        On CPU, torch runs a packed batch whose sequences differ in length through its
        own per-step loop, whose backward costs O(steps x tokens) (3-4x slower here than
        oneDNN's fused kernel). When the final state is not needed, such a batch runs
        padded instead: the padding is compute spent on nothing, but a bucketed batch
        is >99% real tokens, and only the real positions are read back.
        """
        emb_mask, out_mask = masks
        batch_sizes = inputs.batch_sizes
        rows = None
        if emb_mask is not None or out_mask is not None:
            rows = _sequence_rows(batch_sizes).to(inputs.data.device)  # (N,)
            emb_mask = None if emb_mask is None else emb_mask[rows]  # (N, E)
            out_mask = None if out_mask is None else out_mask[rows]  # (N, H)
        x = self._dropout(self.embed(inputs.data), self.dropout_emb, emb_mask)  # (N, E)
        if not need_state and x.device.type == "cpu" and batch_sizes[0] != batch_sizes[-1]:
            steps, width = len(batch_sizes), int(batch_sizes[0])
            rows = _sequence_rows(batch_sizes) if rows is None else rows.cpu()  # (N,) sorted row of each token
            t = torch.repeat_interleave(torch.arange(steps), batch_sizes)  # (N,) time step of each token
            flat = t * width + rows  # (N,) position in the padded (T, B) grid
            padded = x.new_zeros(steps * width, x.size(1)).index_copy(0, flat, x).view(steps, width, -1)  # (T, B, E)
            out, _ = self.rnn(padded, st.to_torch(None if state is None else _to_sorted(state, inputs)))  # (T, B, H)
            h = self._dropout(out.reshape(steps * width, -1)[flat], self.dropout_out, out_mask)  # (N, H)
            return h, self._logits(h) if logits else None, None
        # nn.RNNBase sorts the caller's state by inputs.sorted_indices and un-sorts h_n.
        out, hx = self.rnn(inputs._replace(data=x), st.to_torch(state))
        h = self._dropout(out.data, self.dropout_out, out_mask)  # (N, H)
        return h, self._logits(h) if logits else None, st.from_torch(hx)

    def _forward_stepwise(
        self,
        inputs: PackedSequence,
        state: State | None,
        masks: tuple[Tensor | None, Tensor | None],
        teacher_forcing: float,
        sample: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor | None, State]:
        emb_mask, out_mask = masks
        batch_sizes = inputs.batch_sizes.tolist()
        truth = inputs.data  # (N,)
        state = self.init_state(batch_sizes[0], truth.device) if state is None else _to_sorted(state, inputs)
        free_running = teacher_forcing < 1.0
        if free_running:
            use_truth = torch.rand(truth.numel(), generator=generator, device=truth.device) < teacher_forcing  # (N,)
        hs: list[Tensor] = []
        logits: list[Tensor | None] = []
        ended: list[State] = []  # states of sequences as they finish: shortest last
        prev: Tensor | None = None  # (bs_{t-1},) predictions of the previous step
        offset = 0
        for t, bs in enumerate(batch_sizes):
            tokens = truth[offset : offset + bs]  # (bs,)
            if free_running and t > 0:
                tokens = torch.where(use_truth[offset : offset + bs], tokens, prev[:bs])
            running = st.hidden(state).size(1)
            if bs < running:  # the (sorted) tail has ended: keep its state, drop it from the batch
                ended.append(st.narrow(state, running - bs, start=bs))
                state = st.narrow(state, bs)
            h, state = self._step_hidden(
                tokens,
                state,
                None if emb_mask is None else emb_mask[:bs],
                None if out_mask is None else out_mask[:bs],
            )  # (bs, H)
            step_logits = self._logits(h)  # (bs, V) or None
            if free_running:
                prev = self._predict(h, step_logits, sample, generator)
            hs.append(h)
            logits.append(step_logits)
            offset += bs
        ended.append(state)
        state = st.cat(ended[::-1])  # sorted order, longest first
        all_logits = None if self.adaptive else torch.cat(logits)  # (N, V)
        return torch.cat(hs), all_logits, _to_caller(state, inputs)

    # -- decoding ------------------------------------------------------------------------

    def prefill(self, inputs: PackedSequence, state: State | None = None) -> tuple[Tensor, State]:
        """Run whole prompts as one packed batch.

        Args:
            inputs: packed prompt token ids (any order; ``sorted_indices`` respected).
            state: initial state in the caller's order, or ``None`` for zeros.

        Returns:
            scores ``(B, V)`` for the token after each prompt (logits, or log-probs with
            the adaptive softmax) and the final state, both in the caller's order.
        """
        x = self._dropout(self.embed(inputs.data), self.dropout_emb, None)  # (N, E)
        _, hx = self.rnn(inputs._replace(data=x), st.to_torch(state))
        state = st.from_torch(hx)
        # A unidirectional RNN's top-layer h_n is its output at each sequence's last real step.
        h = self._dropout(st.hidden(state)[-1], self.dropout_out, None)  # (B, H)
        return self._scores(h), state

    def step(self, tokens: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Advance every sequence by one token.

        Args:
            tokens: ``(B,)`` token ids.
            state: state for these ``B`` sequences, or ``None`` for zeros.

        Returns:
            scores ``(B, V)`` for the next token (logits, or log-probs with the adaptive
            softmax) and the new state.
        """
        if state is None:
            state = self.init_state(tokens.size(0), tokens.device)
        h, state = self._step_hidden(tokens, state)  # (B, H)
        return self._scores(h), state


def build_model(m: ModelConfig, vocab_size: int) -> RNNLM:
    """The model a recipe's ``model:`` section describes.

    Raises:
        UserError: a combination the model refuses.
    """
    try:
        return RNNLM(
            vocab_size, cell=m.cell, embed_dim=m.embed_dim, hidden_size=m.hidden_size, num_layers=m.num_layers,
            dropout_emb=m.dropout_emb, dropout_rnn=m.dropout_rnn if m.num_layers > 1 else 0.0,
            dropout_out=m.dropout_out, locked_dropout=m.locked_dropout, tie_weights=m.tie_weights,
            adaptive_cutoffs=m.adaptive_cutoffs, pad_id=0,
        )
    except ValueError as e:
        raise UserError(f"model: {e}") from None
