"""Fixtures for the trainer tests: a small deterministic toy corpus, prepared once per
session, and a factory writing tiny recipes that point at it.

The toy language has enough structure for a 16-unit GRU to learn within a few dozen
steps (agreement, fixed word order, a counting pattern), so "the loss falls" is a real
check, and it is small enough that an epoch takes a fraction of a second.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]

_NOUNS = ["cat", "dog", "bird", "fox", "child", "robot"]
_VERBS = ["sees", "chases", "likes", "finds"]
_ADJS = ["small", "red", "quick", "old"]
_NUMBERS = ["one", "two", "three", "four", "five", "six"]


def toy_line(rng: random.Random) -> str:
    """One sentence of the toy language (3 to 14 words)."""
    kind = rng.randrange(3)
    if kind == 0:  # the ADJ NOUN VERB the NOUN .
        return f"the {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)} ."
    if kind == 1:  # counting: one two three ... N stop
        n = rng.randint(2, 6)
        return " ".join(_NUMBERS[:n]) + " stop"
    # a NOUN and a NOUN VERB a NOUN and then sleep .
    return f"a {rng.choice(_NOUNS)} and a {rng.choice(_NOUNS)} {rng.choice(_VERBS)} a {rng.choice(_NOUNS)} and then sleep ."


def write_toy_corpus(folder: Path, *, train: int = 300, valid: int = 40, test: int = 40, seed: int = 0) -> Path:
    """``folder/{train,valid,test}.txt``, deterministic for a given seed."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for name, n in (("train", train), ("valid", valid), ("test", test)):
        if n:
            (folder / f"{name}.txt").write_text("\n".join(toy_line(rng) for _ in range(n)) + "\n", encoding="utf-8")
    return folder


# The data section every trainer test shares. It equals recipes/tiny.yaml's once its
# source and output are overridden, so a CLI run of that recipe hits the prepare cache.
def toy_data_section(corpus: Path, prepared: Path) -> dict:
    return {"source": {"dir": str(corpus)}, "output": str(prepared), "tokenizer": {"kind": "word"}}


TINY_MODEL = {"cell": "gru", "embed_dim": 16, "hidden_size": 16, "num_layers": 1,
              "dropout_emb": 0.0, "dropout_rnn": 0.0, "dropout_out": 0.0}
TINY_TRAIN = {"device": "cpu", "max_tokens": 256, "optimizer": "adamw", "lr": 0.01, "schedule": "constant",
              "clip": 1.0, "epochs": 2, "log_every": 1, "plot": False, "amp": False}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: intra-op threads only add sync overhead on a loaded 2-core machine,
    and one thread also makes in-process runs use the same kernels as the subprocesses
    (which get OMP_NUM_THREADS=1), so their results compare bit for bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``corpus/{train,valid,test}.txt``: 300 / 40 / 40 lines of the toy language. Read-only."""
    return write_toy_corpus(tmp_path_factory.mktemp("toy") / "corpus")


@pytest.fixture(scope="session")
def toy_prepared(toy_corpus: Path) -> Path:
    """The toy corpus through ``pipeline.prepare`` (word tokenizer), once per session. Read-only:
    recipes made by ``toy_recipe`` point here and get a cache hit."""
    from pipeline.config import DataConfig
    from pipeline.typed_yaml import from_dict
    from pipeline.prepare import prepare

    out = toy_corpus.parent / "prepared"
    prepare(from_dict(DataConfig, toy_data_section(toy_corpus, out), "data", toy_corpus.parent), quiet=True)
    return out


def write_recipe(folder: Path, corpus: Path, prepared: Path, name: str = "recipe", *, model: dict | None = None,
                 train: dict | None = None, data: dict | None = None) -> Path:
    """``folder/<name>.yaml``: the toy data, ``TINY_MODEL`` and ``TINY_TRAIN`` updated by the
    given keys, and ``train.output_dir = folder/<name>``."""
    recipe = {
        "data": {**toy_data_section(corpus, prepared), **(data or {})},
        "model": {**TINY_MODEL, **(model or {})},
        "train": {**TINY_TRAIN, "output_dir": str(folder / name), **(train or {})},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def recipe_writer(toy_corpus: Path, toy_prepared: Path):
    """``recipe_writer(folder, name="recipe", model=..., train=..., data=...)``: ``write_recipe``
    on the toy data, into any folder (for module-scoped fixtures)."""
    return lambda folder, name="recipe", **sections: write_recipe(folder, toy_corpus, toy_prepared, name, **sections)


@pytest.fixture
def toy_recipe(tmp_path: Path, recipe_writer):
    """Factory: ``toy_recipe(name="recipe", model={...}, train={...}, data={...})`` writes
    ``tmp_path/<name>.yaml`` (see ``write_recipe``) and returns its path."""
    return lambda name="recipe", **sections: recipe_writer(tmp_path, name, **sections)


@pytest.fixture(scope="session")
def lm_env() -> dict:
    """Environment for ``python -m lm.*`` subprocesses: one thread, this checkout importable,
    no ``RNNLM_DEBUG`` (errors must look the way a user sees them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RNNLM_DEBUG", None)
    return env
