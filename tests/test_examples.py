"""examples/: each runs as a reader runs it (a fresh interpreter, from the repository root)
and reaches high held-out accuracy; the same training with each label paired to another
row's output (the classic bug of sorting for pack_padded_sequence) stays at the majority
rate — so the accuracy threshold does measure that every label met its own row."""
from __future__ import annotations

import importlib.util
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

from pipeline import PackedCollator
from pipeline.collate import PackedBatch

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = ["classify", "tag"]


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    """Both examples started at once, as ``python examples/NAME.py``: name -> finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    procs = {n: subprocess.Popen([sys.executable, f"examples/{n}.py"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in EXAMPLES}
    out = {}
    for n, p in procs.items():
        try:
            stdout, stderr = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
        out[n] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_reaches_high_held_out_accuracy(name, runs):
    proc = runs[name]
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.fullmatch(r"held-out accuracy (\d\.\d{3})\n", proc.stdout)
    assert m, proc.stdout
    assert float(m.group(1)) >= 0.95


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_is_short(name):
    assert len((REPO / "examples" / f"{name}.py").read_text(encoding="utf-8").splitlines()) < 60


def labels_in_packed_order(rows: list[dict]) -> PackedBatch:
    """The classic bug: labels taken in the sorted (packed) order, the state in the caller's."""
    batch = PackedCollator(shift=False)(rows)
    batch.fields["label"] = batch.fields["label"][batch.indices]
    return batch


def tags_in_packed_order(rows: list[dict]) -> PackedBatch:
    """The same for tags: packed without the indices that restore the caller's order."""
    batch = PackedCollator(shift=False, pack_fields=["tags"])(rows)
    tags = batch.fields["tags"]
    batch.fields["tags"] = PackedSequence(tags.data, tags.batch_sizes)
    return batch


def majority_rate(name: str, module: ModuleType) -> float:
    """Accuracy of always answering the commoner class, on a fresh sample of the task."""
    rows = module.make_rows(3000, random.Random(1))
    values = [r["label"] for r in rows] if name == "classify" else [t for r in rows for t in r["tags"]]
    p = sum(values) / len(values)
    return max(p, 1 - p)


@pytest.mark.parametrize("name, collate", [("classify", labels_in_packed_order), ("tag", tags_in_packed_order)])
def test_misaligned_labels_leave_accuracy_at_the_majority_rate(name, collate):
    module = load(name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        accuracy = module.run(collate=collate)
    finally:
        torch.set_num_threads(threads)
    assert accuracy <= majority_rate(name, module) + 0.05  # 0.50 for classify, 0.70 for tag
