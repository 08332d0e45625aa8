"""Building torch's recurrent modules, and running one with weights of the caller's choosing.

:func:`run_rnn` calls the same fused kernel ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` call
(``torch._VF``: cuDNN on a GPU, oneDNN on a CPU) but with an explicit weight list, so a
regulariser can substitute a dropped hidden-to-hidden matrix for one forward call
(weight drop) or run the layers one call each with its own mask between them (locked
dropout between layers). The module keeps owning the parameters; its state-dict keys
do not change.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, _VF, nn

from lm.state import State

_CELLS: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
_KERNELS = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}


def make_rnn(
    cell: str, input_size: int, hidden_size: int, num_layers: int, dropout: float, bidirectional: bool
) -> nn.RNNBase:
    """``nn.GRU`` | ``nn.LSTM`` | ``nn.RNN`` (tanh) by name; a bad name lists the choices."""
    if cell not in _CELLS:
        raise ValueError(f"unknown cell {cell!r}; choose one of {sorted(_CELLS)}")
    # nn.RNN defaults to tanh, the classic Elman cell.
    return _CELLS[cell](input_size, hidden_size, num_layers, dropout=dropout, bidirectional=bidirectional)


def check_prob(name: str, p: float) -> None:
    """Raise ``ValueError`` unless ``p`` is a dropout probability in [0, 1)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")


def layer_weights(rnn: nn.RNNBase) -> list[list[Tensor]]:
    """The module's own parameters per layer: ``[weight_ih, weight_hh, bias_ih, bias_hh]``.

    Unidirectional modules with biases only (what :class:`lm.model.RNNLM` builds).
    """
    if rnn.bidirectional or not rnn.bias or getattr(rnn, "proj_size", 0):
        raise ValueError("run_rnn supports unidirectional RNNs with biases and no projection")
    names = ("weight_ih_l{}", "weight_hh_l{}", "bias_ih_l{}", "bias_hh_l{}")
    return [[getattr(rnn, n.format(k)) for n in names] for k in range(rnn.num_layers)]


def _kernel(rnn: nn.RNNBase, x: Tensor, batch_sizes: Tensor | None, hx: State, weights: list[Tensor],
            num_layers: int, dropout: float) -> tuple[Tensor, State]:
    fn = _KERNELS[rnn.mode]
    hx = tuple(s.contiguous() for s in hx)  # a layer's slice or a narrowed batch is a strided view
    arg = hx if len(hx) == 2 else hx[0]  # LSTM takes (h, c), the others a bare h
    _quiet_weight_copy()
    if batch_sizes is None:
        result = fn(x, arg, weights, True, num_layers, dropout, rnn.training, False, False)
    else:
        result = fn(x, batch_sizes, arg, weights, True, num_layers, dropout, rnn.training, False)
    return result[0], tuple(result[1:])


_WEIGHT_COPY = "RNN module weights are not part of single contiguous chunk"


def _quiet_weight_copy() -> None:
    """A dropped matrix is not a view into the module's flat weight buffer, so cuDNN copies
    the weights into one for the call (the price of weight drop) and warns "not part of
    single contiguous chunk of memory" on every call. Filtered once per process, on first
    use: a ``catch_warnings`` block per call would reset Python's once-per-location
    registry and make every other warning repeat."""
    # Looked up each time, not remembered: a caller's catch_warnings block may have dropped it.
    if not any(f[1] is not None and f[1].pattern == _WEIGHT_COPY for f in warnings.filters):
        warnings.filterwarnings("ignore", message=_WEIGHT_COPY)


def run_rnn(
    rnn: nn.RNNBase,
    x: Tensor,
    batch_sizes: Tensor | None,
    hx: State,
    weights: list[list[Tensor]],
    between: Sequence[Tensor] | None = None,
) -> tuple[Tensor, State]:
    """Run ``rnn``'s kernel with ``weights`` in place of its parameters.

    Args:
        rnn: a unidirectional ``nn.GRU`` / ``nn.LSTM`` / ``nn.RNN`` (its mode, training
            flag and between-layer ``dropout`` are used; not its parameters).
        x: packed data ``(N, E)`` (with ``batch_sizes``) or a time-major ``(T, B, E)`` batch.
        batch_sizes: the packed batch's CPU ``batch_sizes``, or ``None`` for ``(T, B, E)``.
        hx: initial state, each ``(num_layers, B, H)``, in the batch's (sorted) row order.
        weights: per layer ``[weight_ih, weight_hh, bias_ih, bias_hh]`` (see :func:`layer_weights`).
        between: ``None`` runs all layers as one call (torch's own between-layer dropout,
            ``rnn.dropout``, applies). Otherwise one multiplier per layer boundary
            (``num_layers - 1`` of them, each broadcastable to a layer's output: ``(N, H)``
            packed or ``(1, B, H)`` padded), and each layer runs as its own call.

    Returns:
        top-layer outputs (same layout as ``x``) and the final state, each ``(num_layers, B, H)``.
    """
    if between is None:
        flat = [w for layer in weights for w in layer]
        return _kernel(rnn, x, batch_sizes, hx, flat, len(weights), rnn.dropout)
    if len(between) != len(weights) - 1:
        raise ValueError(f"{len(weights)} layers need {len(weights) - 1} between-layer multipliers, got {len(between)}")
    finals: list[State] = []
    for k, layer in enumerate(weights):
        x, final = _kernel(rnn, x, batch_sizes, tuple(s[k : k + 1] for s in hx), layer, 1, 0.0)  # (N, H) or (T, B, H)
        finals.append(final)
        if k < len(between):
            x = x * between[k]
    return x, tuple(torch.cat(parts) for parts in zip(*finals))
