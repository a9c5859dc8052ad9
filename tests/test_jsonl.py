import pytest

from cotgen.jsonl import read_jsonl, write_jsonl


def test_round_trip_skips_blank_lines(tmp_path):
    path = tmp_path / "a" / "rows.jsonl"
    write_jsonl(path, [{"x": 1}, {"y": [2, 3]}])
    path.write_text(path.read_text() + "\n\n")
    assert read_jsonl(path) == [{"x": 1}, {"y": [2, 3]}]


def test_missing_file_and_bad_line_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the pairs stage"):
        read_jsonl(tmp_path / "none.jsonl", "run the pairs stage")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"x": 1}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2 is not JSON"):
        read_jsonl(bad)
