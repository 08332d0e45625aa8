"""PEP 561: both packages carry a py.typed marker and pyproject.toml ships it, so users'
type checkers read the annotations of ``pipeline`` and ``lm`` (checked in a built wheel
by hand: ``pip wheel --no-build-isolation --no-deps .`` lists ``lm/py.typed`` and
``pipeline/py.typed``)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["pipeline", "lm"])
def test_package_ships_a_py_typed_marker(package):
    assert (REPO / package / "py.typed").is_file()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    shipped = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["package-data"]
    assert "py.typed" in shipped[package]
    # the package users import is this one (editable install), marker beside its __init__
    assert Path(importlib.util.find_spec(package).origin).parent == REPO / package
