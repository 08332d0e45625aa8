"""Recurrent state, one interface for GRU, LSTM and vanilla RNN.

A state is always a tuple of tensors shaped ``(num_layers * num_dirs, B, H)``:
``(h,)`` for GRU and RNN, ``(h, c)`` for LSTM. ``h`` always comes first, so code that
needs the hidden state reads ``state[0]`` whatever the cell. Train, eval and decode use
only the functions below; the difference between ``nn.LSTM``'s ``(h, c)`` argument and
``nn.GRU``'s bare ``h`` is resolved here, in :func:`to_torch` / :func:`from_torch`, and
nowhere else.

The batch dimension is dim 1 (as ``nn.LSTM`` / ``nn.GRU`` want it), whatever layout the
data has.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]


def init_state(
    rnn: nn.RNNBase,
    batch_size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> State:
    """Zero state for ``rnn``, what the module itself uses when given no state.

    Args:
        rnn: an ``nn.GRU``, ``nn.LSTM`` or ``nn.RNN``.
        batch_size: number of sequences.
        device: defaults to the device of ``rnn``'s weights.
        dtype: defaults to the dtype of ``rnn``'s weights.

    Returns:
        ``(h,)`` or, for an LSTM, ``(h, c)``; each ``(num_layers * num_dirs, B, H)``.
    """
    weight = rnn.all_weights[0][0]
    device = weight.device if device is None else device
    dtype = weight.dtype if dtype is None else dtype
    num_rows = rnn.num_layers * (2 if rnn.bidirectional else 1)
    # The only place the kind of cell matters: LSTM carries a cell state next to h.
    arity = 2 if isinstance(rnn, nn.LSTM) else 1
    return tuple(
        torch.zeros(num_rows, batch_size, rnn.hidden_size, device=device, dtype=dtype)
        for _ in range(arity)
    )


def to_torch(state: State | None) -> Tensor | tuple[Tensor, Tensor] | None:
    """The ``hx`` argument ``nn.GRU`` / ``nn.RNN`` (a tensor) or ``nn.LSTM`` (a pair) wants."""
    if state is None:
        return None
    # narrow() leaves views with a stride over layers; cuDNN wants dense hx (no-op if dense).
    state = tuple(s.contiguous() for s in state)
    return state[0] if len(state) == 1 else state


def from_torch(hx: Tensor | tuple[Tensor, ...]) -> State:
    """Wrap the ``h_n`` / ``(h_n, c_n)`` a torch RNN returned as a :data:`State`."""
    return tuple(hx) if isinstance(hx, tuple) else (hx,)


def hidden(state: State) -> Tensor:
    """The hidden state ``h`` ``(num_layers * num_dirs, B, H)``; for an LSTM not ``c``."""
    return state[0]


def select(state: State, index: Tensor) -> State:
    """Rows ``index`` of the batch dimension (reorder, or drop finished sequences)."""
    return tuple(s.index_select(1, index) for s in state)


def narrow(state: State, n: int, *, start: int = 0) -> State:
    """Batch rows ``start : start + n``, a view; the step loop keeps the first ``n``."""
    return tuple(s.narrow(1, start, n) for s in state)


def cat(states: list[State]) -> State:
    """Concatenate states along the batch dimension."""
    return tuple(torch.cat(parts, dim=1) for parts in zip(*states))


def detach(state: State | None) -> State | None:
    """Cut the graph, for truncated backprop through a carried state."""
    return None if state is None else tuple(s.detach() for s in state)


def by_layer(h: Tensor, num_layers: int, num_dirs: int) -> Tensor:
    """View ``h_n`` ``(num_layers * num_dirs, B, H)`` as ``(num_layers, num_dirs, B, H)``.

    Torch stacks layer-major, direction-minor: row ``2 * l + d`` is layer ``l``,
    direction ``d`` (0 forward, 1 backward), so ``by_layer(h, L, 2)[-1, 0]`` is the top
    layer's forward state.
    """
    return h.view(num_layers, num_dirs, *h.shape[1:])
