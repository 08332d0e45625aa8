"""The one encoder: ``<bos> ids <eos>`` rows the same from every path, and ``data.max_len``."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pipeline.encode import Encoder, apply_max_len, frame
from pipeline.fast_word import WordEncoder, word_tokenizer
from pipeline.tokenizer import SPECIALS

LINES = ["the cat sat", "", None, "  the dog  ", "a<unk>b sat", "cat\x1fdog"]


def test_frame_puts_bos_and_eos_around_each_text():
    rows = frame(np.array([7, 8, 9], np.int32), np.array([2, 0, 1]), bos=1, eos=2)
    assert rows.to_pylist() == [[1, 7, 8, 2], [1, 2], [1, 9, 2]]


def test_word_level_rows_are_the_same_from_every_path():
    tok = word_tokenizer(["the", "cat", "sat", "dog"], SPECIALS, unk="<unk>")  # ids 4..7
    # U+001F is no whitespace to tokenizers (it is to Arrow): one unknown word
    want = [[1, 4, 5, 6, 2], [1, 2], [1, 2], [1, 4, 7, 2], [1, 3, 3, 3, 6, 2], [1, 3, 2]]
    assert Encoder(tok, 1, 2).encode(LINES) == want
    assert Encoder(tok, 1, 2).encode_arrow(pa.array(LINES)).to_pylist() == want
    assert WordEncoder(tok, 1, 2).encode(LINES) == want
    assert WordEncoder(tok, 1, 2).encode_arrow(pa.array(LINES)).to_pylist() == want


def test_subword_rows_are_the_tokenizers_ids_between_bos_and_eos():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.train_from_iterator(["the cat sat on the mat"] * 5, trainers.BpeTrainer(vocab_size=40, special_tokens=list(SPECIALS), show_progress=False))
    texts = ["the cat", "mat sat on", "", None]
    want = [[1, *tok.encode(t or "", add_special_tokens=False).ids, 2] for t in texts]
    assert len(want[0]) > 2 and want[2] == want[3] == [1, 2]
    assert Encoder(tok, 1, 2).encode(texts) == want
    assert Encoder(tok, 1, 2).encode_arrow(pa.array(texts)).to_pylist() == want


ROWS = [[1, 10, 11, 12, 13, 2], [1, 10, 2], [1, 2]]


@pytest.mark.parametrize("overflow, want", [
    ("split", [[1, 10, 11], [11, 12, 13], [13, 2], [1, 10, 2], [1, 2]]),  # windows overlap by one id
    ("truncate", [[1, 10, 11], [1, 10, 2], [1, 2]]),
    ("drop", [[1, 10, 2], [1, 2]]),
])
def test_max_len_policies(overflow, want):
    assert apply_max_len(ROWS, 3, overflow) == want
    assert apply_max_len(ROWS, None, overflow) == ROWS
    assert apply_max_len(ROWS, 6, overflow) == ROWS
