"""Recipes: dotted overrides parsed to field types, strict keys and types with exact
messages, path resolution, source precedence, every recipe in recipes/ loads, and every
numeric key of every section refuses NaN, ±inf, negatives and huge values (property test)."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import DataConfig, load_data_config, load_recipe
from pipeline.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]


def recipe(folder: Path, data: object, name: str = "recipe.yaml") -> Path:
    """Write ``{"data": data}`` as a recipe file and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def load(tmp_path: Path, *overrides: str, **data) -> DataConfig:
    return load_data_config(recipe(tmp_path, {"source": {"dir": "src"}, **data}), list(overrides))


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    return str(e.value)


# --------------------------------------------------------------------------- types


def test_overrides_are_parsed_to_the_field_types(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load(
        tmp_path,
        "data.max_len=1_024",  # int | None
        "data.holdout=0.25",  # float
        "data.tokenizer.lowercase=yes",  # bool
        "data.tokenizer.nfkc=off",
        "data.tokenizer.vocab_size=null",  # int | None → None
        "data.mode=document",  # Literal
        "data.tokenizer.kind=bytelevel",
        "data.text_column=body",  # str
        "data.source.files.train=[a.txt, sub/b.txt]",  # list[Path]
        "data.source.files.test=c.txt",  # a single value for a list field
        "data.output=out",  # Path
        tokenizer={"vocab_size": 500},
    )
    assert cfg.max_len == 1024 and type(cfg.max_len) is int
    assert cfg.holdout == 0.25 and type(cfg.holdout) is float
    assert cfg.tokenizer.lowercase is True and cfg.tokenizer.nfkc is False
    assert cfg.tokenizer.vocab_size is None
    assert cfg.mode == "document" and cfg.tokenizer.kind == "bytelevel"
    assert cfg.text_column == "body"
    assert cfg.source.files.train == [tmp_path / "a.txt", tmp_path / "sub" / "b.txt"]
    assert cfg.source.files.test == [tmp_path / "c.txt"]
    assert cfg.source.dir is None  # files= on the command line replaced the recipe's dir
    assert cfg.output == tmp_path / "out"


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("On", True), ("false", False), ("no", False), ("0", False)])
def test_bool_overrides(tmp_path, text, value):
    assert load(tmp_path, f"data.tokenizer.lowercase={text}").tokenizer.lowercase is value


def test_yaml_values_keep_their_types(tmp_path):
    cfg = load(tmp_path, max_len=64, holdout=1e-1, tokenizer={"kind": "char", "lowercase": True, "vocab_size": None})
    assert (cfg.max_len, cfg.holdout, cfg.tokenizer.kind, cfg.tokenizer.lowercase, cfg.tokenizer.vocab_size) == (64, 0.1, "char", True, None)


def test_an_empty_override_means_none_for_optional_fields(tmp_path):
    assert load(tmp_path, "data.max_len=", max_len=12).max_len is None


# --------------------------------------------------------------------------- strictness


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.tokeniser.kind=bpe", "unknown key data.tokeniser — did you mean data.tokenizer?"),
        ("data.max_length=64", "unknown key data.max_length — did you mean data.max_len?"),
        ("data.tokenizer.vocabsize=64", "unknown key data.tokenizer.vocabsize — did you mean data.tokenizer.vocab_size?"),
        ("data.source.directory=x", "unknown key data.source.directory — did you mean data.source.dir?"),
        ("data.qqqqq=1", "unknown key data.qqqqq"),
    ],
)
def test_unknown_override_names_the_closest_key(tmp_path, override, message):
    assert error(load, tmp_path, override) == message


def test_unknown_recipe_key_names_the_closest_key(tmp_path):
    assert error(load, tmp_path, tokeniser={"kind": "bpe"}) == "unknown key data.tokeniser — did you mean data.tokenizer?"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_len=abc", "data.max_len=abc: expected int | null"),
        ("data.max_len=1.5", "data.max_len=1.5: expected int | null"),
        ("data.holdout=much", "data.holdout=much: expected float"),
        ("data.tokenizer.lowercase=maybe", "data.tokenizer.lowercase=maybe: expected bool"),
        ("data.mode=sentence", "data.mode=sentence: expected 'line' | 'document'"),
        ("data.tokenizer.kind=wordpiece", "data.tokenizer.kind=wordpiece: expected 'word' | 'bpe' | 'bytelevel' | 'unigram' | 'char'"),
        ("data.tokenizer=bpe", "data.tokenizer must be a section (a mapping of keys), got 'bpe'"),
    ],
)
def test_wrong_override_type_names_key_value_and_type(tmp_path, override, message):
    assert error(load, tmp_path, override) == message


@pytest.mark.parametrize(
    "data, message",
    [
        ({"max_len": "12"}, "data.max_len='12': expected int | null"),
        ({"max_len": True}, "data.max_len=True: expected int | null"),
        ({"holdout": "0.1"}, "data.holdout='0.1': expected float"),
        ({"tokenizer": {"lowercase": 1}}, "data.tokenizer.lowercase=1: expected bool"),
        ({"output": ["a"]}, "data.output=['a']: expected Path"),
        ({"source": {"files": {"train": "a.txt"}}}, "data.source.files.train='a.txt': expected list[Path]"),
    ],
)
def test_wrong_recipe_type_names_key_value_and_type(tmp_path, data, message):
    raw = {"source": {"dir": "src"}, **data}
    if "source" in data:
        raw["source"] = data["source"]
    assert error(load_data_config, recipe(tmp_path, raw)) == message


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_len=1", "data.max_len=1: a sequence needs at least 2 ids (<bos> and one predicted token)"),
        ("data.holdout=1.0", "data.holdout=1.0: must be between 0 and 1"),
        ("data.holdout=0", "data.holdout=0.0: must be between 0 and 1"),
        ("data.num_proc=0", "data.num_proc=0: must be >= 1"),
        ("data.tokenizer.vocab_size=4", "data.tokenizer.vocab_size=4: too small (at least 8)"),
        ("data.tokenizer.min_frequency=0", "data.tokenizer.min_frequency=0: must be >= 1"),
        ("data.source.dir=", "data.source.hub|dir|files.train: set exactly one of them (got: none)"),
    ],
)
def test_invalid_values_fail_once_in_post_init(tmp_path, override, message):
    assert error(load, tmp_path, override) == message


def test_two_sources_in_one_recipe_fail(tmp_path):
    path = recipe(tmp_path, {"source": {"hub": "a/b", "dir": "src"}})
    assert error(load_data_config, path) == "data.source.hub|dir|files.train: set exactly one of them (got: hub, dir)"


def test_yaml_syntax_error_gives_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("data:\n  source: {dir: src\n  output: out\n")
    message = error(load_data_config, path)
    assert message.startswith(f"{path}:3:9: YAML syntax error: ")  # the ':' after 'output'


@pytest.mark.parametrize(
    "text, message",
    [
        ("- data\n", "a recipe is a mapping of sections (data:, model:, train:), got list"),
        ("model: {}\n", "the recipe has no data: section"),
    ],
)
def test_recipe_shape_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert error(load_data_config, path) == f"{path}: {message}"


def test_missing_recipe(tmp_path):
    assert error(load_data_config, tmp_path / "nope.yaml") == f"recipe not found: {tmp_path / 'nope.yaml'}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.max_len", "override 'data.max_len' is not of the form key=value (e.g. data.max_len=128)"),
        ("model.cell=gru", "override model.cell: pipeline.prepare only reads data.* keys"),
        ("data.mode.x=1", "override data.mode.x: mode is a value, not a section"),
    ],
)
def test_malformed_overrides(tmp_path, override, message):
    assert error(load, tmp_path, override, mode="line") == message


def test_override_into_an_empty_section(tmp_path):
    # regression: `data:` with nothing under it is YAML null; an override into it crashed
    path = tmp_path / "r.yaml"
    path.write_text("data:\n")
    cfg = load_data_config(path, [f"data.source.dir={tmp_path}", "data.max_len=8"])
    assert (cfg.source.dir, cfg.max_len) == (tmp_path, 8)
    path.write_text("data: 3\n")
    assert error(load_data_config, path, ["data.source.dir=x"]) == "override data.source.dir: data is a value, not a section"


# --------------------------------------------------------------------------- paths


def test_recipe_paths_resolve_against_the_recipe_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = recipe(tmp_path / "recipes", {"source": {"dir": "../corpus"}, "output": "out", "tokenizer": {"path": "tok/t.json"}})
    cfg = load_data_config(path)
    assert cfg.source.dir == tmp_path / "corpus"
    assert cfg.output == tmp_path / "recipes" / "out"
    assert cfg.tokenizer.path == tmp_path / "recipes" / "tok" / "t.json"


def test_override_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    path = recipe(tmp_path / "recipes", {"source": {"dir": "../corpus"}, "output": "out"})
    cfg = load_data_config(path, ["data.source.dir=../data", "data.output=prepared", f"data.tokenizer.path={tmp_path}/t.json"])
    assert cfg.source.dir == tmp_path / "data"
    assert cfg.output == tmp_path / "cwd" / "prepared"
    assert cfg.tokenizer.path == tmp_path / "t.json"  # absolute stays absolute
    assert load_data_config(path, ["data.output=~/x"]).output == Path.home() / "x"


def test_list_override_items_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = recipe(tmp_path / "recipes", {"source": {"files": {"train": ["a.txt"], "validation": ["v.txt"]}}})
    cfg = load_data_config(path)
    assert cfg.source.files.train == [tmp_path / "recipes" / "a.txt"]
    cfg = load_data_config(path, ["data.source.files.train=[x.txt, y.txt]"])
    assert cfg.source.files.train == [tmp_path / "x.txt", tmp_path / "y.txt"]
    assert cfg.source.files.validation == [tmp_path / "recipes" / "v.txt"]  # untouched: still the recipe's


# --------------------------------------------------------------------------- source precedence


def test_a_dir_override_replaces_the_hub_source(tmp_path):
    cfg = load_data_config(REPO_ROOT / "recipes" / "wikitext.yaml", [f"data.source.dir={tmp_path}"])
    assert (cfg.source.hub, cfg.source.name, cfg.source.revision, cfg.source.dir) == (None, None, None, tmp_path)
    hub = load_data_config(REPO_ROOT / "recipes" / "wikitext.yaml")
    assert (hub.source.hub, hub.source.name, hub.source.dir) == ("Salesforce/wikitext", "wikitext-2-v1", None)


def test_a_hub_override_replaces_a_dir_source(tmp_path):
    cfg = load(tmp_path, "data.source.hub=org/corpus", "data.source.name=v2")
    assert (cfg.source.hub, cfg.source.name, cfg.source.dir) == ("org/corpus", "v2", None)


def test_a_files_override_replaces_a_hub_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_data_config(REPO_ROOT / "recipes" / "wikitext.yaml", ["data.source.files.train=t.txt"])
    assert (cfg.source.hub, cfg.source.name, cfg.source.files.train) == (None, None, [tmp_path / "t.txt"])


def test_overriding_only_the_hub_config_keeps_the_hub(tmp_path):
    cfg = load_data_config(REPO_ROOT / "recipes" / "wikitext.yaml", ["data.source.name=wikitext-103-v1"])
    assert (cfg.source.hub, cfg.source.name) == ("Salesforce/wikitext", "wikitext-103-v1")


def test_load_recipe_keeps_other_sections_and_returns_the_recipe_folder(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: {dir: src}}\nmodel: {cell: gru}\n")
    raw, base = load_recipe(path, ["data.max_len=12"])
    assert raw == {"data": {"source": {"dir": "src"}, "max_len": "12"}, "model": {"cell": "gru"}}
    assert base == tmp_path


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_data_section_loads(path):
    cfg = load_data_config(path)
    assert cfg.output.is_absolute()
    assert (cfg.source.hub is not None) + (cfg.source.dir is not None) + bool(cfg.source.files.train) == 1


# --------------------------------------------------------------------------- numbers: finite and in range, generically


def numeric_keys(cls: type, prefix: str) -> list[tuple[str, type, bool]]:
    """Every numeric key of a section, nested ones included: (dotted key, int|float, is a list)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(tp):
            out += numeric_keys(tp, key)
            continue
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        for a in args:
            is_list = typing.get_origin(a) is list
            base = typing.get_args(a)[0] if is_list else a
            if base in (int, float):
                out.append((key, base, is_list))
    return out


def _all_keys():
    from lm.config import ModelConfig, TrainConfig

    return (numeric_keys(DataConfig, "data") + numeric_keys(ModelConfig, "model") + numeric_keys(TrainConfig, "train"))


NUMERIC_KEYS = _all_keys()
BAD = {
    float: st.one_of(st.sampled_from(["nan", "inf", "-inf", "NaN", "-1", "1e300", "-0.5"]),
                     st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(repr),
                     st.floats(min_value=1e13, allow_nan=False, allow_infinity=False).map(repr)),
    int: st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", str(2**32), str(10**30)]),
                   st.integers(max_value=-1).map(str), st.integers(min_value=2**32).map(str)),
}


def test_every_section_has_numeric_keys_to_check():
    keys = {k for k, _, _ in NUMERIC_KEYS}
    assert {"data.holdout", "data.tokenizer.vocab_size", "model.hidden_size", "model.adaptive_cutoffs", "train.lr",
            "train.max_time", "train.teacher_forcing.k"} <= keys
    assert len(keys) >= 37  # every int and float key of the three sections (37 when written)


@pytest.fixture(scope="module")
def full_recipe(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("numbers")
    (folder / "src").mkdir()
    (folder / "src" / "train.txt").write_text("a b c\n")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"data": {"source": {"dir": "src"}, "output": "out"},
                                    "model": {}, "train": {"output_dir": "run"}}))
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_numeric_key_refuses_nan_inf_negative_and_huge(full_recipe, data):
    """The recipe loader of lm.train (all sections) and the prepare CLI (data section):
    one error line naming the key, exit 2, nothing written."""
    from lm.config import load as load_recipe_all
    from pipeline.prepare import main as prepare_main

    key, base, is_list = data.draw(st.sampled_from(NUMERIC_KEYS))
    value = data.draw(BAD[base])
    override = f"{key}={f'[{value}]' if is_list else value}"
    with pytest.raises(UserError) as e:
        load_recipe_all(full_recipe, [override])
    assert str(e.value).startswith(f"{key}=") and "\n" not in str(e.value), (override, str(e.value))
    if key.startswith("data."):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = prepare_main([str(full_recipe), override, "--quiet"])
        assert rc == 2 and err.getvalue().startswith(f"error: {key}=") and err.getvalue().count("\n") == 1, err.getvalue()
        assert not (full_recipe.parent / "out").exists()


@pytest.mark.parametrize("override, message", [
    ("train.lr=nan", "train.lr=nan: must be a finite number"),
    ("train.lr=0", "train.lr=0.0: must be > 0"),
    ("train.min_lr=-1", "train.min_lr=-1.0: must be >= 0"),
    ("train.min_lr=0.5", "train.min_lr=0.5: must be <= lr=0.002 (the floor of the learning rate)"),
    ("train.max_time=nan", "train.max_time=nan: must be a finite number"),
    ("train.max_time=0", "train.max_time=0.0: must be > 0"),
    ("train.clip=nan", "train.clip=nan: must be a finite number"),
    ("train.clip=inf", "train.clip=inf: must be a finite number"),
    ("train.warmup_steps=-5", "train.warmup_steps=-5: must be >= 0"),
    ("model.hidden_size=100000", "model.hidden_size=100000: must be <= 65536"),
    ("model.dropout_out=1", "model.dropout_out=1.0: must be < 1"),
    ("model.adaptive_cutoffs=[100, -3]", "model.adaptive_cutoffs=-3: must be >= 1"),
    ("data.tokenizer.vocab_size=1000000000000", "data.tokenizer.vocab_size=1000000000000: must be <= 16777216"),
    ("train.teacher_forcing.k=-inf", "train.teacher_forcing.k=-inf: must be a finite number"),
    ("train.prompts=[a, b", "train.prompts=[a, b: YAML syntax error: expected ',' or ']', but got '<stream end>'"),
])
def test_number_and_list_messages(full_recipe, override, message):
    from lm.config import load as load_recipe_all

    assert error(load_recipe_all, full_recipe, [override]) == message


def test_yaml_exponent_floats_are_floats_and_a_quoted_one_stays_a_string(tmp_path):
    from lm.config import load as load_recipe_all

    path = tmp_path / "r.yaml"
    path.write_text("data: {source: {dir: src}}\ntrain: {lr: 1e-3, min_lr: 5E-5, max_time: 1_2e2}\n")
    cfg = load_recipe_all(path).train
    assert (cfg.lr, cfg.min_lr, cfg.max_time) == (0.001, 5e-05, 1200.0)
    path.write_text("data: {source: {dir: src}}\ntrain: {lr: '1e-3'}\n")
    assert error(load_recipe_all, path) == "train.lr='1e-3': expected float"


def test_defaults_pass_the_generic_checks(full_recipe):
    from lm.config import load as load_recipe_all

    r = load_recipe_all(full_recipe)
    assert r.train.lr == 2e-3 and math.isfinite(r.train.clip)
