"""Bidirectional, multi-layer recurrent encoder over packed batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from lm import state as st
from lm.rnn import check_prob, make_rnn
from lm.state import State
from pipeline.collate import PackedBatch


@dataclass
class EncoderOutput:
    """What :meth:`RNNEncoder.forward` returns.

    Attributes:
        outputs: ``(L, B, num_dirs * H)`` (``(B, L, ...)`` if ``batch_first``), caller's
            order, zeros past each sequence's length; forward direction in the first
            ``H`` features, backward in the last ``H``.
        lengths: ``(B,)`` CPU int64 lengths, caller's order.
        state: ``(h_n,)`` or ``(h_n, c_n)``, each ``(num_layers * num_dirs, B, H)``,
            caller's order; see :meth:`RNNEncoder.by_layer`.
    """

    outputs: Tensor
    lengths: Tensor
    state: State


class RNNEncoder(nn.Module):
    """Embedding → (bidirectional, multi-layer) GRU | LSTM | RNN encoder for packed batches.

    Args:
        vocab_size: number of token ids.
        cell: ``"gru"``, ``"lstm"`` or ``"rnn"``.
        embed_dim: embedding size.
        hidden_size: hidden size per direction.
        num_layers: stacked layers.
        bidirectional: run a backward direction too.
        dropout: dropout between layers.
        pad_id: padding id for ``nn.Embedding``'s ``padding_idx`` (or ``None``).
        batch_first: return ``outputs`` as ``(B, L, ...)``.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        cell: str = "gru",
        embed_dim: int = 256,
        hidden_size: int = 256,
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        pad_id: int | None = 0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        check_prob("dropout", dropout)
        self.batch_first = batch_first
        self.num_dirs = 2 if bidirectional else 1
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        self.rnn = make_rnn(cell, embed_dim, hidden_size, num_layers, dropout, bidirectional)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        """Zero state, each tensor ``(num_layers * num_dirs, B, H)``."""
        return st.init_state(self.rnn, batch_size, device=device)

    def forward(self, batch: PackedBatch | PackedSequence, state: State | None = None) -> EncoderOutput:
        """Encode packed token ids.

        Args:
            batch: a collated batch (its ``inputs`` are encoded) or a ``PackedSequence``.
            state: initial state in the caller's order, or ``None`` for zeros.

        Returns:
            :class:`EncoderOutput`, in the caller's order.
        """
        inputs = batch.inputs if isinstance(batch, PackedBatch) else batch
        x = inputs._replace(data=self.embed(inputs.data))  # (N, E)
        out, hx = self.rnn(x, st.to_torch(state))
        outputs, lengths = pad_packed_sequence(out, batch_first=self.batch_first)  # (L, B, D*H)
        return EncoderOutput(outputs=outputs, lengths=lengths, state=st.from_torch(hx))

    def by_layer(self, state: State) -> State:
        """View each state tensor as ``(num_layers, num_dirs, B, H)``: ``[-1, 0]`` is the
        top layer's forward direction, ``[-1, 1]`` its backward direction."""
        return tuple(st.by_layer(s, self.rnn.num_layers, self.num_dirs) for s in state)
