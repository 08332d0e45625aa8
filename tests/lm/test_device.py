"""Device names: what exists here resolves, anything else is one line naming the option;
GPUs are simulated by patching torch.cuda (a real one is used when present)."""
from __future__ import annotations

import pytest
import torch

from lm.device import resolve_device
from pipeline.errors import UserError


def error(*args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        resolve_device(*args, **kwargs)
    return str(e.value)


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cpu_names(no_gpu):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu:0") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert error("cpu:7") == "train.device=cpu:7: there is one CPU device, cpu (or cpu:0)"
    assert error("cpu:5", option="--device") == "--device=cpu:5: there is one CPU device, cpu (or cpu:0)"


@pytest.mark.parametrize("name", ["garbage", "CPU", "", "cuda:x", "cuda:-1", "gpu"])
def test_names_that_are_not_devices(no_gpu, name):
    assert error(name) == f"train.device={name}: not a device (use auto, cpu, cuda, cuda:N or mps)"


@pytest.mark.parametrize("name", ["meta", "xpu", "xla"])
def test_devices_this_toolkit_does_not_train_on(no_gpu, name):
    assert error(name) == f"train.device={name}: not supported (use auto, cpu, cuda, cuda:N or mps)"


def test_missing_accelerators(no_gpu):
    assert error("cuda") == "train.device=cuda but no CUDA GPU is available (use train.device=auto or cpu)"
    assert error("cuda:1", option="--device") == "--device=cuda:1 but no CUDA GPU is available (use --device=auto or cpu)"
    assert error("mps") == "train.device=mps but MPS is not available (use train.device=auto or cpu)"


def test_gpus_by_index_and_local_rank(two_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert error("cuda:9") == "train.device=cuda:9: no such GPU (this machine has 2: cuda:0 to cuda:1)"
    assert error("cuda", local_rank=2) == "train.device=cuda: no such GPU (this machine has 2: cuda:0 to cuda:1)"


def test_auto_prefers_mps_only_for_one_process(monkeypatch, no_gpu):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    assert resolve_device("auto", world=2) == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_real_gpu():
    n = torch.cuda.device_count()
    assert resolve_device("cuda") == torch.device("cuda", 0)
    torch.zeros(1, device=resolve_device(f"cuda:{n - 1}"))
    assert error(f"cuda:{n}").startswith(f"train.device=cuda:{n}: no such GPU (this machine has {n}: cuda:0")
