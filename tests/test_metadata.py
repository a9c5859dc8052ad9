import json

import pytest

from cotgen.geneval.metadata import MetadataError, load_metadata

GOOD = {"tag": "position", "prompt": "a photo of a circle left of a square",
        "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]}


def write(tmp_path, *lines):
    path = tmp_path / "meta.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_loads_official_file(geneval_data):
    lines = load_metadata(geneval_data / "evaluation_metadata.jsonl")
    assert len(lines) == 553


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**GOOD, "tag": "shapes"}, "unknown tag 'shapes'"),
        ({k: v for k, v in GOOD.items() if k != "include"}, "missing 'include'"),
        ({**GOOD, "include": [GOOD["include"][0], {"class": "circle", "count": 1, "position": ["left of", 1]}]},
         "must point to an earlier include"),
        ({**GOOD, "include": [{"class": "circle", "count": 1, "position": ["left of", 0]}]}, "points forward"),
        ({**GOOD, "include": [{"class": "circle", "count": 1, "color": "grey"}]}, "colour 'grey'"),
        ({**GOOD, "include": [{"class": "circle", "count": 0}]}, "count must be an integer >= 1"),
        ({**GOOD, "include": [{"class": "circle", "count": 1, "position": ["near", 0]}][:1] + [
            {"class": "s", "count": 1, "position": ["near", 0]}]}, "unknown relation 'near'"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, bad, message):
    path = write(tmp_path, GOOD, bad)
    with pytest.raises(MetadataError) as e:
        load_metadata(path)
    assert f"{path}:2" in str(e.value) and message in str(e.value)


def test_bad_json_and_empty(tmp_path):
    with pytest.raises(MetadataError, match=r"meta.jsonl:1: not valid JSON"):
        load_metadata(write(tmp_path, "{nope"))
    with pytest.raises(MetadataError, match="no metadata lines"):
        load_metadata(write(tmp_path, ""))
    with pytest.raises(FileNotFoundError):
        load_metadata(tmp_path / "absent.jsonl")


def test_unknown_class_when_vocabulary_given(tmp_path):
    with pytest.raises(MetadataError, match="unknown class 'circle'"):
        load_metadata(write(tmp_path, GOOD), classnames=["square"])
