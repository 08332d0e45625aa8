"""Mixed precision: which layers compute in which dtype, decided once per run.

Why the recurrent layers are special. ``torch.autocast``'s wrapper for the cuDNN RNN
(``aten/src/ATen/cudnn/AutocastRNN.cpp``) casts the input, the state and a re-flattened
copy of the weights to **fp16**, whatever dtype the autocast region asks for. So a
``torch.autocast("cuda", dtype=torch.bfloat16)`` around an ``nn.LSTM`` trains the LSTM in
fp16 — without loss scaling, unless a ``GradScaler`` was set up — and re-flattens its
weights on every call (every time step in the scheduled-sampling loop). cuDNN itself
takes bf16 RNNs only from cuDNN 9.13 (pytorch PR #164411; before that torch routes bf16
RNNs to its slow non-cuDNN kernels, pytorch#88136), and only with bf16 *weights*, i.e.
without fp32 master weights. Hence the policy (:func:`choose`):

=========  =================  ==============================  ==========  ===========
amp        device             output layer / adaptive softmax  RNN         GradScaler
=========  =================  ==============================  ==========  ===========
off        any                fp32                             fp32        no
bf16       cuda               bf16 autocast                    fp32/TF32   no
fp16       cuda (cuDNN)       fp16 autocast                    fp16 cuDNN  yes
fp16       cuda (no cuDNN)    fp16 autocast                    fp32/TF32   yes
bf16       cpu                bf16 autocast (full softmax)     fp32        no
auto       cuda               as bf16
auto       cpu, mps           as off
=========  =================  ==============================  ==========  ===========

torch's adaptive softmax gets fp32 inputs under any autocast (it fails on fp16 ones),
and on a CPU it runs without autocast (CPU autocast breaks it).

The RNN is never put in bf16, even on cuDNN >= 9.13: that needs bf16 weights (no fp32
master copy) or a per-call cast that autocast does not offer; a bf16 RNN would be a
separate, measured change. It never runs fp16 without a ``GradScaler``. ``off`` is plain
fp32 (TF32 off too); the other CUDA modes allow TF32 for fp32 matmuls and cuDNN.

Use (the trainer)::

    policy = precision.for_device(cfg.amp, device)
    policy.apply(model)             # RNN layers leave autocast (when the policy says so), TF32 flags
    scaler = policy.grad_scaler()   # a disabled scaler is a pass-through
    with policy.autocast():
        out = model(batch, ...)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer); clip_grad_norm_(...)
    scaler.step(optimizer); scaler.update()
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["Amp", "CUDNN_BF16_RNN", "Precision", "choose", "for_device", "normalize"]

Amp = Literal["auto", "off", "bf16", "fp16"]
AMP_CHOICES: tuple[str, ...] = ("auto", "off", "bf16", "fp16")
CUDNN_BF16_RNN = 91300  # torch.backends.cudnn.version() from which cuDNN has bf16 RNN kernels


def normalize(amp: str | bool) -> str:
    """The ``train.amp`` option as one of :data:`AMP_CHOICES` (``True`` → ``auto``, ``False`` → ``off``).

    Raises:
        ValueError: anything else.
    """
    if isinstance(amp, bool):
        return "auto" if amp else "off"
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp={amp!r}: expected one of {', '.join(AMP_CHOICES)} (or true/false)")
    return amp


@dataclass(frozen=True)
class Precision:
    """What runs in which dtype on one device (see the module docstring for the table).

    Attributes:
        device_type: ``"cuda"``, ``"cpu"`` or ``"mps"``.
        dtype: the autocast dtype of the region :meth:`autocast` opens (output layer,
            adaptive softmax); ``None``: no autocast.
        rnn_dtype: what the recurrent layers compute in (``float32`` or ``float16``).
        scaler: whether the loss must be scaled (fp16 anywhere in the backward pass).
        tf32: whether fp32 matmuls and cuDNN may use TF32 (CUDA only).
        description: one line for the start-of-run log.
    """

    device_type: str
    dtype: torch.dtype | None
    rnn_dtype: torch.dtype
    scaler: bool
    tf32: bool
    description: str

    @property
    def rnn_outside_autocast(self) -> bool:
        """The RNN layers must leave the autocast region (which would cast them to fp16)."""
        return self.dtype is not None and self.rnn_dtype == torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region for the forward pass (a no-op context without autocast)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A ``GradScaler`` for this policy; disabled (a pass-through) unless :attr:`scaler`."""
        # a disabled scaler on a device without one still constructs; "cuda" is its default device
        return torch.amp.GradScaler(self.device_type if self.scaler else "cuda", enabled=self.scaler)

    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` (in place) and the backend flags for this policy.

        With :attr:`rnn_outside_autocast`, every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` in
        ``model`` gets a subclass whose ``forward`` turns autocast off and casts its
        input and state to fp32, so it runs in fp32/TF32 inside :meth:`autocast`. With
        any autocast the adaptive softmax gets fp32 inputs (torch's fails on fp16 ones
        under autocast) and on a CPU runs without autocast (see
        :class:`FP32AdaptiveLogSoftmaxWithLoss`). Parameters, ``state_dict`` keys and hooks are unchanged. Call it before wrapping
        the model in DDP. Idempotent.

        Returns:
            ``model``.
        """
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
        swap = dict(_FP32_CLASSES) if self.rnn_outside_autocast else {}
        if self.dtype is not None:
            swap[nn.AdaptiveLogSoftmaxWithLoss] = FP32AdaptiveLogSoftmaxWithLoss
        for m in model.modules():
            if type(m) in swap:
                m.__class__ = swap[type(m)]
        return model


def choose(amp: str | bool, device_type: str, cudnn_version: int | None) -> Precision:
    """The precision policy for ``train.amp`` on a device type: a pure function.

    Args:
        amp: ``auto``, ``off``, ``bf16``, ``fp16`` (or ``True``/``False`` for auto/off).
        device_type: ``cuda``, ``cpu`` or ``mps``.
        cudnn_version: ``torch.backends.cudnn.version()`` (e.g. 91300), ``None`` when
            cuDNN is absent or disabled; read only for CUDA.

    Returns:
        The :class:`Precision` to use.

    Raises:
        ValueError: an unknown option, or one the device cannot run (fp16 on CPU,
            reduced precision on MPS).
    """
    amp = normalize(amp)
    f32 = torch.float32
    if amp == "auto":
        amp = "bf16" if device_type == "cuda" else "off"
    if amp == "off":
        return Precision(device_type, None, f32, False, False, f"precision: fp32 throughout on {device_type} (train.amp=off)")
    if device_type == "cpu":
        if amp == "fp16":
            raise ValueError("amp=fp16 is for CUDA; on a CPU use bf16 (AVX-512 BF16 / AMX) or off")
        return Precision("cpu", torch.bfloat16, f32, False, False,
                         "precision: output layer in bf16 (CPU autocast), RNN in fp32, no loss scaling")
    if device_type != "cuda":
        raise ValueError(f"amp={amp} is not supported on {device_type}; use off (or auto)")
    cudnn = f"cuDNN {cudnn_version}" if cudnn_version else "no cuDNN"
    if amp == "bf16":
        why = ("cuDNN >= 9.13 has bf16 RNN kernels, but only for bf16 weights" if cudnn_version and cudnn_version >= CUDNN_BF16_RNN
               else "bf16 RNNs need cuDNN >= 9.13")
        return Precision("cuda", torch.bfloat16, f32, False, True,
                         f"precision: output layer in bf16 autocast, RNN in fp32/TF32 outside autocast ({cudnn}; {why}), "
                         "no loss scaling")
    if cudnn_version:  # fp16 with cuDNN: autocast's RNN wrapper runs it in fp16
        return Precision("cuda", torch.float16, torch.float16, True, True,
                         f"precision: output layer and RNN in fp16 ({cudnn}), dynamic loss scaling (GradScaler)")
    return Precision("cuda", torch.float16, f32, True, True,
                     "precision: output layer in fp16 autocast, RNN in fp32/TF32 (no cuDNN), dynamic loss scaling (GradScaler)")


def for_device(amp: str | bool, device: torch.device | str) -> Precision:
    """:func:`choose` for a live device: reads the cuDNN version torch would use."""
    device_type = torch.device(device).type
    cudnn_version = None
    if device_type == "cuda" and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled:
        cudnn_version = torch.backends.cudnn.version()
    return choose(amp, device_type, cudnn_version)


# ------------------------------------------------------------------ RNN outside autocast


def _fp32(x):
    """Floating tensors (and PackedSequence data, and tuples of either) as fp32; the rest as is."""
    if x is None:
        return None
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return x._replace(data=x.data.float()) if x.data.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_fp32(t) for t in x)
    return x.float() if torch.is_tensor(x) and x.is_floating_point() else x


class _FP32Forward:
    """Mixin: run the recurrent layer in fp32 with autocast off (its cuDNN wrapper would cast to fp16)."""

    def forward(self, input, hx=None):  # noqa: D401 - nn.RNNBase's signature
        with torch.autocast(_device_type(self), enabled=False):
            return super().forward(_fp32(input), _fp32(hx))


def _device_type(module: nn.Module) -> str:
    return next(module.parameters()).device.type


class FP32AdaptiveLogSoftmaxWithLoss(nn.AdaptiveLogSoftmaxWithLoss):
    """Adaptive softmax that works inside an autocast region: fp32 input, and on a CPU fp32 throughout.

    torch's version writes the clusters' log-probs (``index_copy_``) into an output of the
    input's dtype, so both must agree. On CUDA autocast runs ``log_softmax`` in fp32: an fp32
    input (an fp16 RNN's output is cast here) keeps the linear layers in reduced precision and
    the copy consistent. CPU autocast leaves ``log_softmax`` in bf16, so there the module runs
    with autocast off.
    """

    def _call(self, fn, input, *rest):
        if input.device.type == "cpu":
            with torch.autocast("cpu", enabled=False):
                return fn(_fp32(input), *rest)
        return fn(_fp32(input), *rest)

    def forward(self, input, target):
        return self._call(super().forward, input, target)

    def log_prob(self, input):
        return self._call(super().log_prob, input)

    def predict(self, input):
        return self._call(super().predict, input)


class FP32LSTM(_FP32Forward, nn.LSTM):
    """``nn.LSTM`` that runs in fp32 inside an autocast region (see :meth:`Precision.apply`)."""


class FP32GRU(_FP32Forward, nn.GRU):
    """``nn.GRU`` that runs in fp32 inside an autocast region (see :meth:`Precision.apply`)."""


class FP32RNN(_FP32Forward, nn.RNN):
    """``nn.RNN`` that runs in fp32 inside an autocast region (see :meth:`Precision.apply`)."""


_FP32_CLASSES = {nn.LSTM: FP32LSTM, nn.GRU: FP32GRU, nn.RNN: FP32RNN}
