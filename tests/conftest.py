"""Shared fixtures: the real corpora in ../shared/data (skipped when absent), a tiny-recipe
factory, and WikiText-2 prepared once per session for every test that needs real data.

Two switches:
- ``RNNLM_REQUIRE_DATA=1`` (set by ``.ci/run``) turns "the corpus is absent" into a test
  failure, so CI cannot pass by skipping the real-data tests.
- Tests marked ``@pytest.mark.cuda`` are skipped without a CUDA GPU.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data"


REQUIRE_DATA = "RNNLM_REQUIRE_DATA"


def data_required() -> bool:
    """Whether absent corpora fail the tests that need them (``RNNLM_REQUIRE_DATA`` set, not 0/empty)."""
    return os.environ.get(REQUIRE_DATA, "").strip().lower() not in ("", "0", "false", "no")


def _corpus(name: str, data_dir: Path | None = None) -> Path:
    folder = (DATA_DIR if data_dir is None else data_dir) / name
    if not (folder / "train.txt").is_file():
        why = f"{folder}/train.txt is absent (the real corpora live in ../shared/data, see its README.md)"
        if data_required():
            pytest.fail(f"{why}; {REQUIRE_DATA} is set, so this is a failure, not a skip", pytrace=False)
        pytest.skip(why)
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.cuda`` tests when there is no CUDA GPU."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (may be absent: use the corpus fixtures, which skip)."""
    return DATA_DIR


@pytest.fixture(scope="session")
def wikitext2() -> Path:
    """``../shared/data/wikitext-2`` (train.txt, valid.txt, test.txt); skips when absent."""
    return _corpus("wikitext-2")


@pytest.fixture(scope="session")
def ptb() -> Path:
    """``../shared/data/ptb`` (Mikolov's Penn Treebank); skips when absent."""
    return _corpus("ptb")


@pytest.fixture(scope="session")
def wikitext2_prepared(wikitext2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WikiText-2 through ``recipes/wikitext.yaml`` with local files: the prepared folder.

    Built once per session (about 4 s); treat it as read-only.
    """
    from pipeline.config import load_data_config
    from pipeline.prepare import prepare

    out = tmp_path_factory.mktemp("wikitext2") / "prepared"
    cfg = load_data_config(REPO_ROOT / "recipes" / "wikitext.yaml", [f"data.source.dir={wikitext2}", f"data.output={out}"])
    prepare(cfg, quiet=True)
    return out


@pytest.fixture
def data_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Factory: a validated ``DataConfig`` the way the CLI builds one (recipe file + overrides).

    ``data_cfg(*overrides, **data)`` writes ``tmp_path/recipe.yaml`` holding
    ``data: {source: {dir: src}, output: out, **data}`` and loads it with the dotted
    ``overrides``. The test runs in ``tmp_path``, so relative paths — the recipe's and the
    overrides' alike — land there, never in the repository. Put the corpus in
    ``tmp_path / "src"``.
    """
    from pipeline.config import load_data_config

    monkeypatch.chdir(tmp_path)

    def make(*overrides: str, **data):
        section = {"source": {"dir": "src"}, "output": "out", **data}
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"data": section}))
        return load_data_config(recipe, list(overrides))

    return make
