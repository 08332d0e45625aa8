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
from lm.losses import chunked_nll, linear_cross_entropy_sum
from lm.regularize import activation_penalty, drop_connect, locked_mask, word_dropout_scale
from lm.rnn import check_prob, layer_weights, make_rnn, run_rnn
from lm.state import State
from pipeline.collate import PackedBatch
from pipeline.errors import UserError


def _sequence_rows(batch_sizes: Tensor, device: torch.device | None = None) -> Tensor:
    """Sorted-batch row of every packed token: ``[0..bs_0), [0..bs_1), ...`` as one (N,) tensor.

    Built on the host from the host-side ``batch_sizes``; for a GPU it is copied from pinned
    memory without blocking (a copy from pageable memory would wait for the device).
    """
    starts = torch.cumsum(batch_sizes, 0) - batch_sizes  # (T,) offset of each time step
    rows = torch.arange(int(batch_sizes.sum())) - starts.repeat_interleave(batch_sizes)  # (N,)
    if device is None or device.type == "cpu":
        return rows
    return rows.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else rows.to(device)


def _to_sorted(state: State, packed: PackedSequence) -> State:
    return state if packed.sorted_indices is None else st.select(state, packed.sorted_indices)


def _to_caller(state: State, packed: PackedSequence) -> State:
    return state if packed.unsorted_indices is None else st.select(state, packed.unsorted_indices)


@dataclass
class _Draw:
    """The random masks of one training forward call, shared by all its time steps
    (both forward paths read them, so the step loop sees the fused call's masks)."""

    emb: Tensor | None = None  # (B, E) locked embedding mask, sorted rows
    out: Tensor | None = None  # (B, H) locked output mask
    words: Tensor | None = None  # (V,) whole-word embedding scale
    layers: list[Tensor] | None = None  # num_layers - 1 masks (B, H), locked between layers
    weights: list[list[Tensor]] | None = None  # per-layer RNN weights (weight_hh dropped): run via run_rnn


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
        reg: the activation penalty (AR + TAR, see :func:`lm.regularize.activation_penalty`)
            to add to the training loss; a zero scalar when both are off or not training.
            Not part of ``loss``, so perplexities stay pure NLL.
    """

    loss: Tensor
    nll_sum: Tensor
    num_tokens: int
    logits: Tensor | None
    state: State | None
    reg: Tensor


class RNNLM(nn.Module):
    """Embedding → GRU | LSTM | RNN → softmax (full or adaptive) language model.

    Args:
        vocab_size: number of token ids.
        cell: ``"lstm"``, ``"gru"`` or ``"rnn"`` (tanh).
        embed_dim: embedding size.
        hidden_size: RNN hidden size, also the output layer's input size.
        num_layers: stacked RNN layers.
        dropout_emb: dropout on the embeddings.
        dropout_rnn: dropout between RNN layers (torch's own, inside the fused kernel,
            unless ``locked_dropout_rnn``; torch warns if set with one layer).
        dropout_out: dropout on the top RNN layer's outputs, before the output layer.
        locked_dropout: use one dropout mask per sequence, shared by all its time steps
            (variational dropout), for ``dropout_emb`` and ``dropout_out``.
        locked_dropout_rnn: the same for ``dropout_rnn``; the layers then run one kernel
            call each (over the packed data) with the masks applied between them.
        weight_drop: DropConnect on every layer's hidden-to-hidden matrix, one mask per
            forward call (AWD-LSTM's WeightDrop), still through the fused kernel.
        dropout_words: embedding dropout on whole words: a word id is dropped everywhere
            in the batch (its embedding row zeroed), kept rows scaled by ``1 / (1 - p)``.
        ar: activation regularisation coefficient (AWD-LSTM's alpha); see ``LMOutput.reg``.
        tar: temporal activation regularisation coefficient (beta).
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
        locked_dropout_rnn: bool = False,
        weight_drop: float = 0.0,
        dropout_words: float = 0.0,
        ar: float = 0.0,
        tar: float = 0.0,
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
        for name, p in [("dropout_emb", dropout_emb), ("dropout_rnn", dropout_rnn), ("dropout_out", dropout_out),
                        ("weight_drop", weight_drop), ("dropout_words", dropout_words)]:
            check_prob(name, p)
        if ar < 0 or tar < 0:
            raise ValueError(f"ar and tar must be >= 0, got ar={ar}, tar={tar}")
        if locked_dropout_rnn and (num_layers < 2 or dropout_rnn == 0.0):
            raise ValueError(f"locked_dropout_rnn needs num_layers >= 2 and dropout_rnn > 0 "
                             f"(got num_layers={num_layers}, dropout_rnn={dropout_rnn})")
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
        self.dropout_rnn = dropout_rnn
        self.locked_dropout_rnn = locked_dropout_rnn
        self.weight_drop = weight_drop
        self.dropout_words = dropout_words
        self.ar, self.tar = ar, tar
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        # With locked masks between layers the kernel's own per-step dropout must stay off.
        inner = 0.0 if locked_dropout_rnn else dropout_rnn
        self.rnn = make_rnn(cell, embed_dim, hidden_size, num_layers, inner, bidirectional=False)
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

    @property
    def may_leave_parameters_unused(self) -> bool:
        """Whether a training step can leave a parameter without a gradient, so DDP needs
        ``find_unused_parameters=True``: only the adaptive softmax, whose tail clusters go
        unused in a batch with no target in them. Every regulariser here uses all weights."""
        return self.adaptive

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

    def _draw(self, num_seqs: int) -> _Draw:
        """This call's masks (none in eval mode); locked rows are per sequence, sorted order."""
        draw = _Draw()
        if not self.training:
            return draw
        like, hidden = self.embed.weight, self.rnn.hidden_size
        if self.locked_dropout:
            if self.dropout_emb:
                draw.emb = locked_mask(num_seqs, self.embed.embedding_dim, self.dropout_emb, like)  # (B, E)
            if self.dropout_out:
                draw.out = locked_mask(num_seqs, hidden, self.dropout_out, like)  # (B, H)
        if self.dropout_words:
            draw.words = word_dropout_scale(self.vocab_size, self.dropout_words, like)  # (V,)
        if self.locked_dropout_rnn:
            draw.layers = [locked_mask(num_seqs, hidden, self.dropout_rnn, like) for _ in range(self.rnn.num_layers - 1)]
        if self.weight_drop or self.locked_dropout_rnn:
            draw.weights = layer_weights(self.rnn)
            if self.weight_drop:  # [w_ih, w_hh, b_ih, b_hh] per layer
                draw.weights = [[w_ih, drop_connect(w_hh, self.weight_drop), b_ih, b_hh]
                                for w_ih, w_hh, b_ih, b_hh in draw.weights]
        return draw

    def _embed(self, ids: Tensor, words: Tensor | None) -> Tensor:
        """Embeddings ``(n, E)`` of ``ids`` ``(n,)``, whole words dropped by the ``(V,)`` scale."""
        x = self.embed(ids)  # (n, E)
        return x if words is None else x * words[ids].unsqueeze(1)

    def _penalty(self, dropped: Tensor, raw: Tensor, batch_sizes: Tensor) -> Tensor:
        if not (self.training and (self.ar or self.tar)):
            return torch.zeros((), device=raw.device)
        return activation_penalty(dropped, raw, batch_sizes, self.ar, self.tar)

    @property
    def _head_dtype(self) -> torch.dtype | None:
        """The dtype a precision policy put the full-softmax head in (``None``: fp32)."""
        return getattr(self.head, "_amp_dtype", None)

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
            if h.device.type == "cpu" and not torch.is_grad_enabled():  # evaluation: reused blocks, nothing per chunk
                return chunked_nll(h, self.head.weight, self.head.bias, targets, chunk, self._head_dtype)
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

    def _step_hidden(self, tokens: Tensor, state: State, draw: _Draw | None = None) -> tuple[Tensor, Tensor, State]:
        """One time step for a batch of ``tokens`` ``(b,)``, the first ``b`` sorted rows of
        ``draw``'s masks: top-layer output ``(b, H)`` before and after output dropout, new state."""
        draw = _Draw() if draw is None else draw
        b = tokens.size(0)
        x = self._dropout(self._embed(tokens, draw.words), self.dropout_emb, None if draw.emb is None else draw.emb[:b])
        if draw.weights is None:
            out, hx = self.rnn(x.unsqueeze(0), st.to_torch(state))  # (1, b, H)
            state = st.from_torch(hx)
        else:
            between = None if draw.layers is None else [m[:b].unsqueeze(0) for m in draw.layers]  # (1, b, H)
            out, state = run_rnn(self.rnn, x.unsqueeze(0), None, state, draw.weights, between)  # (1, b, H)
        raw = out.squeeze(0)  # (b, H)
        return raw, self._dropout(raw, self.dropout_out, None if draw.out is None else draw.out[:b]), state

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
        The loss is over the same packed targets either way. In training mode every
        mask drawn once per call (locked dropout, whole-word dropout, weight drop) is the
        same in both paths for the same RNG state; plain per-token dropout comes from the
        same distributions but different random streams. In eval mode no regulariser acts
        and the paths agree to float precision. AR/TAR come back in ``LMOutput.reg``.

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
                a CPU fuses the output layer with the loss (:func:`lm.losses.linear_cross_entropy_sum`,
                its GEMMs in bf16 when the head was put in bf16 by ``train.amp=bf16``).

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
        draw = self._draw(int(inputs.batch_sizes[0]))
        targets = batch.targets.data  # (N,)
        num_tokens = targets.numel()
        if teacher_forcing == 1.0 and not stepwise:
            raw, h, state = self._forward_fused(inputs, state, draw, need_state)  # (N, H) twice
            reg = self._penalty(h, raw, inputs.batch_sizes)
            if not need_logits and not self.adaptive and torch.is_grad_enabled() and targets.device.type == "cpu":
                nll_sum = linear_cross_entropy_sum(h.float(), self.head.weight, self.head.bias, targets,
                                                   dtype=self._head_dtype)
                return LMOutput(loss=nll_sum / num_tokens, nll_sum=nll_sum, num_tokens=num_tokens, logits=None,
                                state=state, reg=reg)
            logits = self._logits(h) if need_logits else None  # (N, V)
        else:
            raw, h, logits, state = self._forward_stepwise(inputs, state, draw, teacher_forcing, sample, generator)
            reg = self._penalty(h, raw, inputs.batch_sizes)
        nll_sum = self._nll(h, logits, targets).sum()
        return LMOutput(loss=nll_sum / num_tokens, nll_sum=nll_sum, num_tokens=num_tokens, logits=logits, state=state,
                        reg=reg)

    def _forward_fused(
        self, inputs: PackedSequence, state: State | None, draw: _Draw, need_state: bool = True
    ) -> tuple[Tensor, Tensor, State | None]:
        """One RNN call over the whole batch (one per layer with locked between-layer masks).

        A batch of equal lengths (every stream-mode window, most bucketed batches) is
        already a time-major ``(T, B)`` grid: it runs unpacked, as a view. On CPU, torch
        runs a packed batch whose sequences differ in length through its own per-step
        loop, whose backward costs O(steps x tokens) (3-4x slower here than oneDNN's
        fused kernel). When the final state is not needed, such a batch runs padded
        instead: the padding is compute spent on nothing, but a bucketed batch is >99%
        real tokens, and only the real positions are read back.

        Returns:
            top-layer outputs ``(N, H)`` before and after output dropout, and the final
            state in the caller's order (``None`` on the padded path).
        """
        batch_sizes = inputs.batch_sizes
        width = int(batch_sizes[0])
        rows = None
        if draw.emb is not None or draw.out is not None or draw.layers is not None:
            rows = _sequence_rows(batch_sizes, inputs.data.device)  # (N,)
        emb_mask = None if draw.emb is None else draw.emb[rows]  # (N, E)
        out_mask = None if draw.out is None else draw.out[rows]  # (N, H)
        x = self._dropout(self._embed(inputs.data, draw.words), self.dropout_emb, emb_mask)  # (N, E)
        uniform = int(batch_sizes[0]) == int(batch_sizes[-1])  # batch_sizes live on the host: no sync
        if uniform or (not need_state and x.device.type == "cpu"):
            steps = len(batch_sizes)
            if uniform:  # equal lengths (stream windows, most bucketed batches): the packed data is the grid
                padded, flat = x.view(steps, width, -1), None  # (T, B, E)
            else:
                rows = _sequence_rows(batch_sizes) if rows is None else rows.cpu()  # (N,) sorted row of each token
                t = torch.repeat_interleave(torch.arange(steps), batch_sizes)  # (N,) time step of each token
                flat = t * width + rows  # (N,) position in the padded (T, B) grid
                padded = x.new_zeros(steps * width, x.size(1)).index_copy(0, flat, x).view(steps, width, -1)  # (T, B, E)
            sorted_state = None if state is None else _to_sorted(state, inputs)
            if draw.weights is None:
                out, hx = self.rnn(padded, st.to_torch(sorted_state))  # (T, B, H)
                hx = st.from_torch(hx)
            else:
                between = None if draw.layers is None else [m.unsqueeze(0) for m in draw.layers]  # (1, B, H)
                sorted_state = self.init_state(width, x.device) if sorted_state is None else sorted_state
                out, hx = run_rnn(self.rnn, padded, None, sorted_state, draw.weights, between)  # (T, B, H)
            raw = out.reshape(steps * width, -1)  # (T * B, H)
            raw = raw if flat is None else raw[flat]  # (N, H)
            return raw, self._dropout(raw, self.dropout_out, out_mask), _to_caller(hx, inputs) if uniform else None
        if draw.weights is None:
            # nn.RNNBase sorts the caller's state by inputs.sorted_indices and un-sorts h_n.
            out, hx = self.rnn(inputs._replace(data=x), st.to_torch(state))
            raw, state = out.data, st.from_torch(hx)  # (N, H)
        else:
            between = None if draw.layers is None else [m[rows] for m in draw.layers]  # (N, H) each
            sorted_state = self.init_state(width, x.device) if state is None else _to_sorted(state, inputs)
            raw, hx = run_rnn(self.rnn, x, batch_sizes, sorted_state, draw.weights, between)  # (N, H)
            state = _to_caller(hx, inputs)
        return raw, self._dropout(raw, self.dropout_out, out_mask), state

    def _forward_stepwise(
        self,
        inputs: PackedSequence,
        state: State | None,
        draw: _Draw,
        teacher_forcing: float,
        sample: bool,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor, Tensor | None, State]:
        batch_sizes = inputs.batch_sizes.tolist()
        truth = inputs.data  # (N,)
        state = self.init_state(batch_sizes[0], truth.device) if state is None else _to_sorted(state, inputs)
        free_running = teacher_forcing < 1.0
        if free_running:
            use_truth = torch.rand(truth.numel(), generator=generator, device=truth.device) < teacher_forcing  # (N,)
        raws: list[Tensor] = []
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
            raw, h, state = self._step_hidden(tokens, state, draw)  # (bs, H) twice
            step_logits = self._logits(h)  # (bs, V) or None
            if free_running:
                prev = self._predict(h, step_logits, sample, generator)
            raws.append(raw)
            hs.append(h)
            logits.append(step_logits)
            offset += bs
        ended.append(state)
        state = st.cat(ended[::-1])  # sorted order, longest first
        all_logits = None if self.adaptive else torch.cat(logits)  # (N, V)
        return torch.cat(raws), torch.cat(hs), all_logits, _to_caller(state, inputs)

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
        _, h, state = self._step_hidden(tokens, state)  # (B, H)
        return self._scores(h), state


def build_model(m: ModelConfig, vocab_size: int) -> RNNLM:
    """The model a recipe's ``model:`` section describes.

    Raises:
        UserError: a combination the model refuses.
    """
    if m.adaptive_cutoffs and max(m.adaptive_cutoffs) >= vocab_size:
        raise UserError(f"model.adaptive_cutoffs={list(m.adaptive_cutoffs)} needs more than {max(m.adaptive_cutoffs)} "
                        f"ids, and this data has {vocab_size:,}: lower the cutoffs, or set model.adaptive_cutoffs=null")
    try:
        model = RNNLM(
            vocab_size, cell=m.cell, embed_dim=m.embed_dim, hidden_size=m.hidden_size, num_layers=m.num_layers,
            dropout_emb=m.dropout_emb, dropout_rnn=m.dropout_rnn if m.num_layers > 1 else 0.0,
            dropout_out=m.dropout_out, locked_dropout=m.locked_dropout, locked_dropout_rnn=m.locked_dropout_rnn,
            weight_drop=m.weight_drop, dropout_words=m.dropout_words, ar=m.ar, tar=m.tar, tie_weights=m.tie_weights,
            adaptive_cutoffs=m.adaptive_cutoffs, pad_id=0,
        )
    except ValueError as e:
        raise UserError(f"model: {e}") from None
    if m.init_range is not None:  # Zaremba et al.: every weight and bias uniform in [-r, r]
        with torch.no_grad():
            for p in model.parameters():
                p.uniform_(-m.init_range, m.init_range)
            model.embed.weight[0].zero_()  # the padding row stays zero
    return model
