"""Folder layout, scoring and summaries, with a stand-in detector whose answer is
written into each image's first pixel (so the tests pin the rules, not a model)."""

import json

import pytest
from PIL import Image

from cotgen.geneval.detector import Detector
from cotgen.geneval.layout import ImageError, LayoutError, load_image, read_folder, write_folder
from cotgen.geneval.metadata import write_metadata
from cotgen.geneval.report import plot_tags
from cotgen.geneval.rules import Detection
from cotgen.geneval.scoring import MissingPromptsError, score_folder, summarize

META = [
    {"tag": "single_object", "prompt": "a photo of a star", "include": [{"class": "star", "count": 1}]},
    {"tag": "counting", "prompt": "a photo of two stars", "include": [{"class": "star", "count": 2}],
     "exclude": [{"class": "star", "count": 3}]},
]


class PixelDetector:
    """Reports ``r`` stars with score ``g/255`` where (r, g, _) is the first pixel."""

    classnames = ("star",)

    def detect(self, image):
        r, g, _ = image.getpixel((0, 0))
        return {"star": [Detection((i, 0, i + 1, 1), g / 255, "red") for i in range(r)]}


def image(stars, score=250):
    return Image.new("RGB", (8, 8), (stars, score, 0))


def test_protocol():
    assert isinstance(PixelDetector(), Detector)


def test_folder_round_trip_and_scores(tmp_path):
    # prompt 0: 1 star (ok), 0 stars (no); prompt 1: 2 stars (ok), 3 (no), 2 at score 0.8 (< 0.9: no)
    images = {0: [image(1), image(0)], 1: [image(2), image(3), image(2, score=204)]}
    write_folder(tmp_path / "out", META, lambda i, m: images[i])
    folders = read_folder(tmp_path / "out")
    assert [f.metadata for f in folders] == META and [len(f.samples) for f in folders] == [2, 3]
    assert (tmp_path / "out/00001/samples/0002.png").is_file()
    write_metadata(tmp_path / "meta.jsonl", META)
    results, summary = score_folder(tmp_path / "out", PixelDetector(), tmp_path / "meta.jsonl", progress=False)
    assert [r["correct"] for r in results] == [True, False, True, False, False]
    assert set(results[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}
    assert json.loads(results[0]["metadata"]) == META[0]
    assert results[3]["reason"] == "expected star<3, found 3"
    assert summary["tags"] == {"single_object": 0.5, "counting": pytest.approx(1 / 3)}
    assert summary["overall"] == pytest.approx((0.5 + 1 / 3) / 2)
    assert summary["correct_images"] == pytest.approx(2 / 5) and summary["correct_prompts"] == 1.0
    assert summary["images"] == 5 and summary["prompts"] == 2 and summary["missing_prompts"] == 0
    plot_tags(tmp_path / "tags.png", summary)
    assert Image.open(tmp_path / "tags.png").size[0] > 100


def test_missing_prompts_listed_unless_partial(tmp_path):
    write_folder(tmp_path / "out", META[:1], lambda i, m: [image(1)])
    extra = META + [{"tag": "single_object", "prompt": "a photo of a heart", "include": [{"class": "heart", "count": 1}]}]
    write_metadata(tmp_path / "meta.jsonl", extra)
    with pytest.raises(MissingPromptsError) as e:
        score_folder(tmp_path / "out", PixelDetector(), tmp_path / "meta.jsonl", progress=False)
    assert "lacks 2 prompt(s)" in str(e.value)
    assert "00001: a photo of two stars" in str(e.value) and "00002: a photo of a heart" in str(e.value)
    _, summary = score_folder(tmp_path / "out", PixelDetector(), tmp_path / "meta.jsonl", allow_partial=True,
                              progress=False)
    assert summary["missing_prompts"] == 2 and summary["prompts"] == 1


def test_summary_overall_is_unweighted_mean_of_tags():
    results = [{"tag": "colors", "metadata": "a", "correct": True}] * 9 + [
        {"tag": "position", "metadata": "b", "correct": False}]
    s = summarize(results)
    assert s["overall"] == 0.5 and s["correct_images"] == 0.9


def test_bad_folders(tmp_path):
    with pytest.raises(LayoutError, match="not a folder"):
        read_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="holds no prompt folders"):
        read_folder(tmp_path / "empty")
    (tmp_path / "x/00000/samples").mkdir(parents=True)
    with pytest.raises(LayoutError, match="missing metadata.jsonl"):
        read_folder(tmp_path / "x")
    (tmp_path / "x/00000/metadata.jsonl").write_text(json.dumps(META[0]) + "\n")
    with pytest.raises(LayoutError, match=r"no samples/\*\.png"):
        read_folder(tmp_path / "x")


def test_bad_images(tmp_path):
    good = tmp_path / "good.png"
    image(1).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ImageError, match="truncated.png"):
        load_image(truncated)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(junk)
    gray, rgba = tmp_path / "gray.png", tmp_path / "rgba.png"
    Image.new("L", (8, 8), 7).save(gray)
    Image.new("RGBA", (8, 8), (1, 2, 3, 0)).save(rgba)
    assert load_image(gray).mode == "RGB" and load_image(rgba).getpixel((0, 0)) == (1, 2, 3)


def test_truncated_image_in_folder_names_file(tmp_path):
    write_folder(tmp_path / "out", META[:1], lambda i, m: [image(1)])
    png = tmp_path / "out/00000/samples/0000.png"
    png.write_bytes(png.read_bytes()[:30])
    with pytest.raises(ImageError, match="0000.png"):
        score_folder(tmp_path / "out", PixelDetector(), progress=False)
