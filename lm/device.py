"""Devices by name: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps`` — checked to exist.

``torch.device`` accepts names of devices that are not there (``cpu:7``, ``cuda:9``,
``mps`` on Linux); the failure then comes much later and reads like something else (a
checkpoint "not readable" because ``map_location`` failed, a run that trains on the CPU
and dies at its final evaluation). :func:`resolve_device` says it at once, naming the
option the user typed.
"""
from __future__ import annotations

import torch

from pipeline.errors import UserError

_CHOICES = "use auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str, local_rank: int = 0, *, option: str = "train.device", world: int = 1) -> torch.device:
    """The ``torch.device`` a device name means on this machine, or a one-line error.

    Args:
        name: ``auto`` (cuda > mps > cpu), ``cpu``, ``cuda`` (the GPU ``local_rank``),
            ``cuda:N``, or ``mps``.
        local_rank: this process's GPU under torchrun (``LOCAL_RANK``).
        option: how the user named the setting, for the message (``--device`` in the CLIs).
        world: processes in the run; ``auto`` never picks ``mps`` for a distributed run.

    Returns:
        A device that exists here.

    Raises:
        UserError: a name that is not a device, or a device this machine does not have.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available() and world == 1:
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"{option}={name}: not a device ({_CHOICES})") from None
    if device.type == "cpu":
        if device.index not in (None, 0):  # torch.load(map_location="cpu:7") fails deep inside
            raise UserError(f"{option}={name}: there is one CPU device, cpu (or cpu:0)")
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{option}={name} but no CUDA GPU is available (use {option}=auto or cpu)")
        n = torch.cuda.device_count()
        index = local_rank if device.index is None else device.index
        if index >= n:
            raise UserError(f"{option}={name}: no such GPU (this machine has {n}: "
                            f"{'cuda:0' if n == 1 else f'cuda:0 to cuda:{n - 1}'})")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{option}={name} but MPS is not available (use {option}=auto or cpu)")
        return device
    raise UserError(f"{option}={name}: not supported ({_CHOICES})")
