"""Every recipe in recipes/ loads whole (data, model, train), builds its model with the
parameter count its numbers imply, holds only keys the code reads with the values the
code gets, and round-trips through the YAML the trainer saves beside a run."""
from __future__ import annotations

import dataclasses
import os
import typing
from pathlib import Path

import pytest
import yaml

from lm.config import Recipe, load
from lm.model import build_model
from lm.report import yaml_text
from pipeline.data import read_manifest
from pipeline.typed_yaml import field_names, to_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO_ROOT / "recipes").glob("*.yaml"))
GATES = {"lstm": 4, "gru": 3, "rnn": 1}


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"tiny.yaml", "wikitext.yaml"}


def vocab_size(recipe: Recipe) -> int:
    """The prepared data's vocabulary when it is there, else a placeholder above every cutoff."""
    try:
        return read_manifest(recipe.data.output)["vocab_size"]
    except Exception:
        return max([1000, *(recipe.model.adaptive_cutoffs or [])]) + 1000


def expected_parameters(m, V: int) -> int:
    """Embedding + stacked RNN (input and recurrent weights, two biases per gate) + output layer."""
    g, E, H = GATES[m.cell], m.embed_dim, m.hidden_size
    rnn = sum(g * H * ((E if layer == 0 else H) + H + 2) for layer in range(m.num_layers))
    if m.adaptive_cutoffs:  # nn.AdaptiveLogSoftmaxWithLoss, div_value 4, no biases
        c = [*m.adaptive_cutoffs, V]
        head = H * (c[0] + len(c) - 1)
        head += sum(H * (H // 4 ** (i + 1)) + (H // 4 ** (i + 1)) * (c[i + 1] - c[i]) for i in range(len(c) - 1))
    else:
        head = V if m.tie_weights else H * V + V  # tied: only the output bias is new
    return V * E + rnn + head


def path_keys(cls: type = Recipe, prefix: str = "") -> set[str]:
    """Dotted names of the fields that hold paths (``metadata=PATH``)."""
    hints = typing.get_type_hints(cls)
    keys = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= path_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            keys.add(f"{prefix}{f.name}")
    return keys


def leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def variants() -> list[tuple[Path, str | None]]:
    """Every recipe as loaded on each device type it has a profile for (``None``: no profile)."""
    out = []
    for path in RECIPES:
        profiles = yaml.safe_load(path.read_text()).get("profiles") or {}
        out += [(path, None), *((path, kind) for kind in profiles)]
    return out


def load_variant(path: Path, kind: str | None) -> tuple[Recipe, dict]:
    """The recipe on a device of type ``kind`` (or one with no profile) and the raw values expected."""
    raw = yaml.safe_load(path.read_text())
    profiles = raw.pop("profiles", None) or {}
    if kind is None:
        free = next(k for k in ("cuda", "mps", "cpu") if k not in profiles)
        return load(path, [f"train.device={free}"] if profiles else []), raw
    for section, values in profiles[kind].items():
        raw[section].update(values)
    return load(path, [f"train.device={kind}"]), raw


@pytest.mark.parametrize("path,kind", variants(), ids=lambda v: getattr(v, "name", v))
def test_recipe_builds_its_model(path: Path, kind):
    recipe, _ = load_variant(path, kind)
    V = vocab_size(recipe)
    m = recipe.model
    model = build_model(m, V)
    assert model.num_parameters() == expected_parameters(m, V) > 0
    assert model.vocab_size == V


@pytest.mark.parametrize("path,kind", variants(), ids=lambda v: getattr(v, "name", v))
def test_recipe_keys_are_read_with_the_values_written(path: Path, kind):
    """On each device type, the recipe's values (its profile's where it has one) are what the code gets."""
    assert set(yaml.safe_load(path.read_text())) <= {"data", "model", "train", "profiles"}
    (recipe, raw), valid, paths = load_variant(path, kind), set(field_names(Recipe)), path_keys()
    loaded = leaves(to_dict(recipe))
    for key, value in leaves(raw).items():
        assert key in valid, key  # (load would have refused it; kept as documentation)
        got = loaded[key]
        if key == "train.device" and "profiles" in path.read_text():
            continue  # set on the command line to pick the profile
        if key in paths and value:  # relative to the recipe file
            resolve = lambda v: os.path.normpath(path.parent / v)  # noqa: E731
            assert got == ([resolve(v) for v in value] if isinstance(value, list) else resolve(value)), key
        else:
            assert got == value, key


def test_command_line_wins_over_the_profile_and_the_profile_over_the_recipe():
    wikitext = REPO_ROOT / "recipes" / "wikitext.yaml"
    on_cpu = load(wikitext, ["train.device=cpu", "train.max_time=60"])
    assert (on_cpu.train.mode, on_cpu.train.batch_size, on_cpu.train.bptt) == ("stream", 32, 35)  # the profile's
    assert (on_cpu.model.hidden_size, on_cpu.train.max_time) == (512, 60.0)  # the profile's, the command line's
    lines = load(wikitext, ["train.device=cpu", "train.mode=sequence", "train.batch_size=null", "train.max_tokens=4096"])
    assert (lines.train.mode, lines.train.batch_size, lines.train.max_tokens) == ("sequence", None, 4096)
    on_gpu = load(wikitext, ["train.device=cuda"])
    assert (on_gpu.train.mode, on_gpu.model.hidden_size, on_gpu.train.max_time) == ("stream", 800, 600.0)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_round_trips_through_the_saved_copy(path: Path, tmp_path: Path):
    """The trainer writes ``to_dict(recipe)`` as ``recipe.yaml`` beside a run; loading that
    file gives the same recipe, with absolute paths wherever it is read from."""
    recipe = load(path)
    saved = tmp_path / "elsewhere" / "recipe.yaml"
    saved.parent.mkdir()
    saved.write_text(yaml_text(to_dict(recipe)))
    assert load(saved) == recipe
