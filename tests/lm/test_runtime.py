"""lm.runtime.tune_allocator: a freed large block stays in the process (no mmap/munmap churn)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lm import runtime

pytestmark = pytest.mark.skipif(runtime._glibc() is None, reason="allocator tuning is for Linux/glibc")

# Resident pages (from /proc/self/statm) before, while holding and after freeing a 300 MB
# tensor whose pages were all written; and whether glibc served it with mmap (mallinfo2).
_PROBE = r"""
import ctypes, json, os, sys
from lm.runtime import tune_allocator
applied = tune_allocator()
import torch

def resident_mb():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = resident_mb()
t = torch.ones(300 * 2**18)  # 300 MB of float32, every page written
held, mmapped = resident_mb(), libc.mallinfo2().hblkhd / 2**20
del t
print(json.dumps({"applied": applied, "before": before, "held": held, "after": resident_mb(), "mmapped": mmapped}))
"""


def _probe(**env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "RNNLM_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_block_stays_resident_and_is_not_mmapped():
    r = _probe()
    assert r["applied"] == runtime.SETTINGS
    assert r["held"] - r["before"] >= 300  # the tensor's pages are resident
    assert r["mmapped"] < 1  # served from the heap, not by a fresh mmap
    assert r["after"] - r["before"] >= 300  # free kept them: the next step reuses them


@pytest.mark.parametrize("env", [{"RNNLM_MALLOC_TUNING": "0"}, {"MALLOC_TOP_PAD_": "131072"}])
def test_switched_off_freed_block_goes_back_to_the_kernel(env):
    r = _probe(**env)
    assert r["applied"] == {}
    assert r["held"] - r["before"] >= 300
    assert r["mmapped"] >= 300  # glibc's default: a block this large is its own mapping
    assert r["after"] - r["before"] < 10  # ... unmapped at free


def test_explicit_switch_wins_and_off_applies_nothing(monkeypatch):
    monkeypatch.setenv("RNNLM_MALLOC_TUNING", "1")
    monkeypatch.setenv("MALLOC_TOP_PAD_", "131072")
    assert runtime.tune_allocator(enabled=False) == {}
    assert runtime.tune_allocator() == {}  # the user's own glibc variable: left alone


def test_release_free_memory_returns_the_kept_block():
    probe = _PROBE.replace('print(json.dumps({"applied"', 'from lm.runtime import release_free_memory\nkept = resident_mb()\n'
                           'release_free_memory()\nprint(json.dumps({"kept": kept, "applied"')
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "RNNLM_MALLOC"))}
    r = json.loads(subprocess.run([sys.executable, "-c", probe], env=environ, capture_output=True, text=True,
                                  check=True).stdout)
    assert r["kept"] - r["before"] >= 300  # tuned: the freed block stayed resident ...
    assert r["after"] - r["before"] < 10  # ... until released
