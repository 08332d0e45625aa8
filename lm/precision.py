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
bf16       cpu                bf16 GEMMs, fp32 softmax         fp32        no
auto       cuda               as bf16
auto       cpu, mps           as off
=========  =================  ==============================  ==========  ===========

On a CPU, teacher-forced training scores the full softmax with the fused output layer +
loss (:func:`lm.losses.linear_cross_entropy_sum`), which reads the head's dtype and runs its
three GEMMs on bf16 operands (fp32 softmax inside the kernel, fp32 gradient sums): on CPUs
with AVX-512 BF16 or AMX that is where bf16 pays (``bench/train_speed.py``). Evaluation and
the scheduled-sampling loop run the head under CPU autocast. An adaptive softmax runs its
head and tail GEMMs in bf16 and everything after them (log-softmax, gathers) in fp32
(:class:`BF16LinearFP32Out` inside :class:`FP32AdaptiveLogSoftmaxWithLoss`): CPU autocast
would leave its ``log_softmax`` in bf16, which torch's adaptive softmax cannot mix with fp32.

How. Reduced precision is put on the *output layer's modules* (:meth:`Precision.apply`
swaps ``nn.Linear`` and ``nn.AdaptiveLogSoftmaxWithLoss`` for subclasses that open their
own autocast region), not around the whole forward pass, so the RNN runs in fp32 however
the model calls it (``nn.LSTM.forward`` or ``torch._VF`` directly, as weight drop does).
Only the fp16-RNN policy opens an autocast region around the forward
(:meth:`Precision.autocast`). torch's adaptive softmax gets fp32 inputs under autocast
(it fails on fp16 ones); on a CPU only its linear layers enter autocast (see above).

The RNN is never put in bf16, even on cuDNN >= 9.13: that needs bf16 weights (no fp32
master copy) or a per-call cast that autocast does not offer; a bf16 RNN would be a
separate, measured change. It never runs fp16 without a ``GradScaler``. ``off`` is plain
fp32 (TF32 off too); the other CUDA modes allow TF32 for fp32 matmuls and cuDNN.

Use (the trainer)::

    policy = precision.for_device(cfg.amp, device)
    policy.apply(model)             # output layer in the policy's dtype; TF32 flags
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

__all__ = ["Amp", "CUDNN_BF16_RNN", "Precision", "choose", "cpu_has_bf16", "for_device", "normalize"]

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
        dtype: what the output layer (linear or adaptive softmax) computes in, under
            autocast; ``None``: fp32, no autocast anywhere.
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
    def ambient(self) -> bool:
        """Whether :meth:`autocast` opens a region around the whole forward (an fp16 RNN)."""
        return self.dtype is not None and self.rnn_dtype != torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        """The region the trainer opens around the forward pass.

        An autocast region only when the RNN itself runs in reduced precision (fp16 with
        cuDNN); otherwise a no-op, since :meth:`apply` gives the output layer its own.
        """
        if not self.ambient:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A ``GradScaler`` for this policy; disabled (a pass-through) unless :attr:`scaler`."""
        # a disabled scaler on a device without one still constructs; "cuda" is its default device
        return torch.amp.GradScaler(self.device_type if self.scaler else "cuda", enabled=self.scaler)

    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` (in place) and the backend flags for this policy.

        With a reduced-precision :attr:`dtype`, every ``nn.Linear`` (the output layer) and
        ``nn.AdaptiveLogSoftmaxWithLoss`` gets a subclass whose methods run under autocast
        to that dtype (:class:`BF16Linear`, ...); on a CPU the adaptive softmax stays fp32
        (:class:`FP32AdaptiveLogSoftmaxWithLoss`) around linear layers that compute in bf16
        and return fp32 (:class:`BF16LinearFP32Out`).
        Parameters, ``state_dict`` keys, tied weights and hooks are unchanged. Call it
        before wrapping the model in DDP. Idempotent.

        Returns:
            ``model``.
        """
        if self.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
        if self.dtype is None:
            return model
        linear, adaptive, inner = _LINEAR[self.dtype], _ADAPTIVE[self.dtype], _LINEAR[self.dtype]
        if self.device_type == "cpu":
            adaptive, inner = FP32AdaptiveLogSoftmaxWithLoss, BF16LinearFP32Out
        done = set()
        for m in model.modules():  # parents before children
            if isinstance(m, nn.AdaptiveLogSoftmaxWithLoss):
                m.__class__ = adaptive
                for c in m.modules():
                    if isinstance(c, nn.Linear):
                        c.__class__ = inner
                        done.add(id(c))
            elif isinstance(m, nn.Linear) and id(m) not in done:
                m.__class__ = linear
        return model


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (x86: AVX-512 BF16 or AMX; elsewhere what oneDNN
    reports). Without it oneDNN emulates bf16 GEMMs, slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    try:
        if hasattr(cpu, "_is_avx512_bf16_supported"):  # an x86 build of torch
            if cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported():
                return True
            if cpu._is_avx2_supported():  # x86 without bf16 instructions
                return False
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older torch, or a build without oneDNN
        return False


def choose(amp: str | bool, device_type: str, cudnn_version: int | None, cpu_bf16: bool = True) -> Precision:
    """The precision policy for ``train.amp`` on a device type: a pure function.

    Args:
        amp: ``auto``, ``off``, ``bf16``, ``fp16`` (or ``True``/``False`` for auto/off).
        device_type: ``cuda``, ``cpu`` or ``mps``.
        cudnn_version: ``torch.backends.cudnn.version()`` (e.g. 91300), ``None`` when
            cuDNN is absent or disabled; read only for CUDA.
        cpu_bf16: whether the CPU has bf16 arithmetic (:func:`cpu_has_bf16`); read only for
            ``bf16`` on a CPU, which falls back to fp32 without it (the description says so).

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
        if not cpu_bf16:
            return Precision("cpu", None, f32, False, False,
                             "precision: fp32 throughout on cpu: train.amp=bf16 asked for, but this CPU has no bf16 "
                             "arithmetic (AVX-512 BF16 / AMX), where bf16 would be emulated and slower")
        return Precision("cpu", torch.bfloat16, f32, False, False,
                         "precision: output layer in bf16 (fused training GEMMs, autocast elsewhere), RNN in fp32, no loss scaling")
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
    """:func:`choose` for a live device: reads the cuDNN version torch would use, and on a
    CPU asked for bf16 whether it has bf16 arithmetic."""
    device_type = torch.device(device).type
    cudnn_version = None
    if device_type == "cuda" and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled:
        cudnn_version = torch.backends.cudnn.version()
    cpu_bf16 = device_type != "cpu" or normalize(amp) != "bf16" or cpu_has_bf16()  # probed only when it matters
    return choose(amp, device_type, cudnn_version, cpu_bf16=cpu_bf16)


# ------------------------------------------------------------------ output layer under autocast


def _fp32(x):
    """A floating tensor as fp32; anything else as is."""
    return x.float() if torch.is_tensor(x) and x.is_floating_point() else x


class _Autocast:
    """Mixin: run the module's methods under autocast to ``_amp_dtype`` (``None``: autocast off),
    with fp32 inputs."""

    _amp_dtype: torch.dtype | None = None

    def _region(self):
        device_type = next(self.parameters()).device.type
        if self._amp_dtype is None:
            return torch.autocast(device_type, enabled=False)
        return torch.autocast(device_type, dtype=self._amp_dtype)


class _AutocastLinear(_Autocast, nn.Linear):
    def forward(self, input):
        with self._region():
            return super().forward(input)


class BF16Linear(_AutocastLinear):
    """``nn.Linear`` computing in bf16 (autocast), fp32 parameters."""

    _amp_dtype = torch.bfloat16


class BF16LinearFP32Out(BF16Linear):
    """``nn.Linear`` computing in bf16 (autocast) and returning fp32: an adaptive softmax's
    layers on a CPU, whose log-softmax and index copies must see fp32."""

    def forward(self, input):
        return super().forward(input).float()


class FP16Linear(_AutocastLinear):
    """``nn.Linear`` computing in fp16 (autocast), fp32 parameters."""

    _amp_dtype = torch.float16


class _AutocastAdaptive(_Autocast, nn.AdaptiveLogSoftmaxWithLoss):
    """torch's adaptive softmax ``index_copy_``s the clusters' log-probs (fp32 under CUDA
    autocast) into an output of its input's dtype: the input is made fp32 first."""

    def forward(self, input, target):
        with self._region():
            return super().forward(_fp32(input), target)

    def log_prob(self, input):
        with self._region():
            return super().log_prob(_fp32(input))

    def predict(self, input):
        with self._region():
            return super().predict(_fp32(input))


class BF16AdaptiveLogSoftmaxWithLoss(_AutocastAdaptive):
    """Adaptive softmax with its linear layers in bf16 (CUDA autocast), log-probs in fp32."""

    _amp_dtype = torch.bfloat16


class FP16AdaptiveLogSoftmaxWithLoss(_AutocastAdaptive):
    """Adaptive softmax with its linear layers in fp16 (CUDA autocast), log-probs in fp32."""

    _amp_dtype = torch.float16


class FP32AdaptiveLogSoftmaxWithLoss(_AutocastAdaptive):
    """Adaptive softmax in fp32 even inside an autocast region: CPU autocast leaves
    ``log_softmax`` in bf16, which torch's adaptive softmax cannot mix with fp32. Its
    linear layers may still compute in bf16 (:class:`BF16LinearFP32Out`)."""

    _amp_dtype = None


_LINEAR = {torch.bfloat16: BF16Linear, torch.float16: FP16Linear}
_ADAPTIVE = {torch.bfloat16: BF16AdaptiveLogSoftmaxWithLoss, torch.float16: FP16AdaptiveLogSoftmaxWithLoss}
