"""The recipe keys' help is generated from the config dataclasses: every key has its type,
default and doc, no doc names a key that no longer exists, and the CLIs print it."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from lm.config import Recipe
from pipeline.config import DataRecipe
from pipeline.confighelp import KeyDoc, attribute_docs, describe, recipe_help, sections
from pipeline.typed_yaml import field_names


def _leaf_keys(cls: type) -> list[str]:
    hints = {}
    for name, sec in [("", cls), *sections(cls)]:
        hints.update({f"{name}.{k}".lstrip("."): v for k, v in typing.get_type_hints(sec).items()})
    return [k for k in field_names(cls) if not dataclasses.is_dataclass(hints[k])]


def test_every_recipe_key_is_described_with_a_doc():
    keys = describe(Recipe)
    assert [k.key for k in keys] == _leaf_keys(Recipe)  # every key, in field order
    assert [k.key for k in keys if not k.doc] == []  # add a line to the class's Attributes: section


@pytest.mark.parametrize("name,cls", sections(Recipe))
def test_no_doc_names_a_key_that_is_gone(name, cls):
    assert set(attribute_docs(cls)) <= {f.name for f in dataclasses.fields(cls)}, name


def test_types_and_defaults_as_a_recipe_writes_them():
    by_key = {k.key: k for k in describe(Recipe)}
    assert by_key["model.cell"] == KeyDoc("model.cell", "'lstm' | 'gru' | 'rnn'", "lstm",
                                          "the recurrent cell: lstm, gru or rnn (Elman, tanh).")
    assert (by_key["data.max_len"].type, by_key["data.max_len"].default) == ("int | null", "null")
    assert (by_key["data.source.files.train"].type, by_key["data.source.files.train"].default) == ("list[path]", "[]")
    assert (by_key["train.amp"].type, by_key["train.amp"].default) == ("'auto' | 'off' | 'bf16' | 'fp16' | bool", "auto")
    assert (by_key["train.teacher_forcing.k"].type, by_key["train.teacher_forcing.k"].default) == ("float", "0.9999")
    assert by_key["train.output_dir"].default == "runs/default"
    assert by_key["model.adaptive_cutoffs"].type == "list[int] | null"


def test_attribute_docs_join_continuation_lines():
    @dataclasses.dataclass
    class C:
        """Prose.

        Attributes:
            a: first line
                continued.
            b (int): typed.
        """

        a: int = 1
        b: int = 2

    assert attribute_docs(C) == {"a": "first line continued.", "b": "typed."}
    assert describe(C, "c.") == [KeyDoc("c.a", "int", "1", "first line continued."),
                                 KeyDoc("c.b", "int", "2", "typed.")]


def test_recipe_help_lists_sections_then_keys():
    text = recipe_help(Recipe)
    headers = [line for line in text.splitlines() if line and not line.startswith(" ")]
    assert headers == ["data:  (pipeline/config.py DataConfig)", "data.source:  (pipeline/config.py SourceConfig)",
                       "data.source.files:  (pipeline/config.py SplitFiles)",
                       "data.tokenizer:  (pipeline/config.py TokenizerConfig)",
                       "data.stream:  (pipeline/config.py StreamConfig)", "model:  (lm/config.py ModelConfig)",
                       "train:  (lm/config.py TrainConfig)",
                       "train.teacher_forcing:  (lm/config.py TeacherForcingConfig)"]
    assert "  model.hidden_size = 200  (int)\n      units per recurrent layer.\n" in text
    assert "``" not in text


@pytest.mark.parametrize("tool", ["lm.train", "pipeline.prepare"])
def test_cli_help_lists_every_key(tool, capsys):
    import lm.train
    import pipeline.prepare

    main, cls = {"lm.train": (lm.train.main, Recipe), "pipeline.prepare": (pipeline.prepare.main, DataRecipe)}[tool]
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for k in describe(cls):
        assert f"  {k.key} = {k.default}  ({k.type})\n" in out
    assert "--debug" in out and "(default: recipes/wikitext.yaml)" in out
    if tool == "pipeline.prepare":
        assert "model." not in out and "--force" in out
