"""pipeline.fast_word: the Arrow word-level path gives the tokenizer.json and the ids the
``tokenizers`` WordLevelTrainer + WordLevel/WhitespaceSplit tokenizer give — on WikiText-2,
PTB, Unicode whitespace, tabs, ``\\r``, information separators and specials inside words."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pipeline import fast_word
from pipeline.config import load_data_config
from pipeline.data import TokenDataset
from pipeline.prepare import prepare
from pipeline.tokenizer import SPECIALS, renumber_word_level

REPO_ROOT = Path(__file__).resolve().parents[2]
# Rust's char::is_whitespace (Unicode White_Space), which WhitespaceSplit splits on
RUST_WHITESPACE = {0x9, 0xA, 0xB, 0xC, 0xD, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F, 0x3000}
TRICKY = [
    "plain words here",
    "\ttab\tseparated\t",
    "carriage\rreturn\r\n",
    "no\u00a0break\u3000ideographic\u2028line\u2029para\u0085nel\u1680ogham\u202fnarrow\u205fmath",
    "unit\x1fsep\x1erecord\x1dgroup\x1cfile",  # split by Arrow, not by Rust: handled by tokenizers
    "\x0bvertical\x0cfeed",
    "a<unk>b <unk> <eos>x y<pad> <bos>",
    "zero\u200bwidth\ufeffbom",  # not whitespace for either
    "",
    "   ",
    "the the the cat cat dog",
]


def reference_tokenizer(lines: list[str], vocab_size: int | None = None, min_frequency: int = 1) -> Tokenizer:
    """What pipeline.prepare built before fast_word: tokenizers' trainer, renumbered."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size or 1 << 30, min_frequency=min_frequency, special_tokens=list(SPECIALS), show_progress=False
    )
    tok.train_from_iterator([lines], trainer=trainer)
    return renumber_word_level(tok)


def reference_rows(tok: Tokenizer, lines: list[str]) -> list[list[int]]:
    return [[1, *e.ids, 2] for e in tok.encode_batch(lines, add_special_tokens=False)]


def fast_tokenizer(lines: list[str], vocab_size: int | None = None, min_frequency: int = 1) -> Tokenizer:
    counts = fast_word.count_words(iter([pa.array(lines, pa.string())]))
    return fast_word.word_tokenizer(fast_word.word_vocab(counts, SPECIALS, vocab_size, min_frequency), SPECIALS, "<unk>")


def test_arrow_whitespace_is_rust_whitespace_plus_the_four_separators():
    cps = [c for c in range(0x110000) if not 0xD800 <= c < 0xE000]
    pieces = pc.list_value_length(pc.utf8_split_whitespace(pa.array([f"a{chr(c)}b" for c in cps]))).to_numpy()
    arrow = {c for c, n in zip(cps, pieces) if n == 2}
    assert arrow - RUST_WHITESPACE == set(fast_word._ARROW_ONLY_SPACE)
    assert RUST_WHITESPACE <= arrow
    split = pre_tokenizers.WhitespaceSplit()
    assert {c for c in arrow | {0x200B, 0xFEFF, 0x180E} if len(split.pre_tokenize_str(f"a{chr(c)}b")) == 2} == RUST_WHITESPACE


def test_tricky_text_same_tokenizer_and_ids():
    ref = reference_tokenizer(TRICKY)
    fast = fast_tokenizer(TRICKY)
    assert fast.to_str() == ref.to_str()
    unseen = ["tab\tunseen\x1fword a<eos>b<unk>", "<unk>", " <pad> ", "cat\r\ndog"]
    enc = fast_word.WordEncoder(fast, 1, 2)
    assert enc.encode_arrow(pa.array(TRICKY + unseen + [None])).to_pylist() == reference_rows(ref, TRICKY + unseen + [""])
    assert enc.encode_arrow(pa.array(["a<unk>b"])).to_pylist() == [[1, 3, 3, 3, 2]]  # cut at the special, as tokenizers does
    assert enc.encode(TRICKY + unseen + [None]) == reference_rows(ref, TRICKY + unseen + [""])  # the tokenizer's own path


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab<unk>\t \r\n\x1c\x1f\u00a0\u3000\u2028é", max_size=25), min_size=1, max_size=12))
def test_random_text_same_tokenizer_and_ids(lines):
    ref = reference_tokenizer(lines)
    fast = fast_tokenizer(lines)
    assert fast.to_str() == ref.to_str()
    assert fast_word.WordEncoder(fast, 1, 2).encode_arrow(pa.array(lines)).to_pylist() == reference_rows(ref, lines)


@pytest.mark.parametrize("vocab_size,min_frequency", [(None, 1), (None, 2), (None, 3), (8, 1), (10, 2), (12, 1)])
def test_vocab_order_ties_min_frequency_and_vocab_size_match_the_trainer(vocab_size, min_frequency):
    # ties at every count, words in non-alphabetical first-seen order, a special in the text
    lines = ["b a c <unk> é Z z", "c b a d <unk>", "d e f f e", "Z é ä a"]
    ref = reference_tokenizer(lines, vocab_size, min_frequency)
    assert fast_tokenizer(lines, vocab_size, min_frequency).to_str() == ref.to_str()


def test_supports_only_what_it_reproduces():
    tok = fast_tokenizer(["a b"])
    assert fast_word.WordEncoder.supports(tok)
    from tokenizers import normalizers

    tok.normalizer = normalizers.Lowercase()
    assert not fast_word.WordEncoder.supports(tok)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    assert not fast_word.WordEncoder.supports(bpe)


def _check_prepared_equals_reference(out: Path, corpus: Path) -> None:
    lines = {s: (corpus / f"{f}.txt").read_text(encoding="utf-8").splitlines() for s, f in
             (("train", "train"), ("validation", "valid"), ("test", "test"))}
    ref = reference_tokenizer(lines["train"])
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads(ref.to_str())
    for split, text in lines.items():
        ds = TokenDataset(out, split)
        got = [ds[i].tolist() for i in range(len(ds))]
        assert got == reference_rows(ref, text), split


def test_wikitext2_prepared_ids_identical_to_tokenizers(wikitext2_prepared, wikitext2):
    _check_prepared_equals_reference(wikitext2_prepared, wikitext2)


def test_ptb_prepared_ids_identical_to_tokenizers(ptb, tmp_path, monkeypatch):
    monkeypatch.setattr(fast_word, "ROWS_PER_CHUNK", 1000)  # 43 train chunks: counts merged, rows in order
    monkeypatch.setattr(fast_word, "BLOCK_BYTES", 1 << 16)  # and 80 blocks of lines
    out = tmp_path / "ptb"
    cfg = load_data_config(REPO_ROOT / "recipes" / "wikitext.yaml", [f"data.source.dir={ptb}", f"data.output={out}"])
    prepare(cfg, quiet=True)
    _check_prepared_equals_reference(out, ptb)


def test_prepare_jsonl_with_unicode_whitespace_identical(data_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(fast_word, "ROWS_PER_CHUNK", 3)  # rows needing tokenizers land in several chunks
    # jsonl keeps \r, \x1c.., U+2028 inside a row (the text loader would break lines there)
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TRICKY), encoding="utf-8")
    (src / "valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(TRICKY)), encoding="utf-8")
    cfg = data_cfg()
    prepare(cfg, quiet=True)
    ref = reference_tokenizer(TRICKY)
    assert json.loads((cfg.output / "tokenizer.json").read_text()) == json.loads(ref.to_str())
    for split, text in (("train", TRICKY), ("validation", TRICKY[::-1])):
        ds = TokenDataset(cfg.output, split)
        assert [ds[i].tolist() for i in range(len(ds))] == reference_rows(ref, text)


@pytest.mark.parametrize("content", [
    "\ufeffone\r\ntwo\rthree\n\nfour\x1cfive\u2028six\x85 seven\r",
    "no newline at end",
    "\n",
    "\r\n\r\n",
    "x\r",
    "a\n" * 50 + "b\r\n" * 50,
])
def test_text_lines_as_datasets_text_loader(content, tmp_path):
    import datasets

    path = tmp_path / "train.txt"
    path.write_text(content, encoding="utf-8")
    ref = datasets.load_dataset("text", data_files={"train": str(path)}, split="train", encoding="utf-8-sig", cache_dir=str(tmp_path / "c"))
    got = fast_word.load_text_lines([path, path], tmp_path / "lines.arrow")
    assert list(got["text"]) == list(ref["text"]) * 2


def test_text_lines_in_small_blocks_as_datasets(monkeypatch, wikitext2, tmp_path):
    import datasets

    monkeypatch.setattr(fast_word, "BLOCK_BYTES", 4096)  # many block edges, \r\n pairs among them
    path = tmp_path / "train.txt"
    path.write_bytes((wikitext2 / "valid.txt").read_bytes().replace(b"\n", b"\r\n"))
    ref = datasets.load_dataset("text", data_files={"train": str(path)}, split="train", encoding="utf-8-sig", cache_dir=str(tmp_path / "c"))
    assert fast_word.load_text_lines([path], tmp_path / "lines.arrow").data.column("text").equals(ref.data.column("text"))
