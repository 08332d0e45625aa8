"""pipeline.sources: the rows a text becomes are the rows datasets' text builder makes of the same file."""
from __future__ import annotations

import pytest

from pipeline.sources import text_units

TEXT = ("\ufeffone\r\ntwo\rthree\x0cstill three\x85and\u2028still\n\n  \nsix\n\n\nseven\n"
        "par two\n\n\n\nlast line, no newline")


@pytest.mark.parametrize("mode, sample_by", [("line", "line"), ("document", "paragraph")])
def test_text_units_are_the_rows_of_datasets_text_builder(tmp_path, mode, sample_by):
    import datasets

    path = tmp_path / "t.txt"
    path.write_bytes(TEXT.encode("utf-8"))
    rows = datasets.load_dataset("text", data_files=str(path), split="train", sample_by=sample_by, encoding="utf-8-sig",
                                 cache_dir=str(tmp_path / "cache"))["text"]
    units = text_units(TEXT[1:], mode)  # lm.evaluate decodes with utf-8-sig: the BOM is gone
    assert units == rows
    if mode == "line":  # only \n (after \r\n, \r) ends a line: 14 rows, not str.splitlines' 17
        assert len(units) == 14 and len(TEXT[1:].splitlines()) == 17
        assert units[:3] == ["one", "two", "three\x0cstill three\x85and\u2028still"]
    else:
        assert units == ["one\ntwo\nthree\x0cstill three\x85and\u2028still", "  \nsix", "\nseven\npar two",
                         "last line, no newline"]
