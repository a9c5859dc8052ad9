"""GenEval's folder layout, both directions (DESIGN section 2).

``<dir>/<5-digit prompt index>/metadata.jsonl`` holds that prompt's metadata line and
``<dir>/<index>/samples/<4-digit>.png`` its images (4 per prompt by default).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from cotgen.geneval.metadata import MetadataError, parse_metadata_lines


class LayoutError(ValueError):
    """A folder does not follow GenEval's layout; the message names the path."""


class ImageError(ValueError):
    """An image cannot be read (missing, unreadable, truncated); names the file."""


@dataclass
class PromptFolder:
    """One prompt's folder: its index, metadata line and sample PNG paths (sorted)."""

    index: int
    metadata: dict
    samples: list[Path]


def prompt_dir(root: str | Path, index: int) -> Path:
    """``<root>/<index:05d>``."""
    return Path(root) / f"{index:05d}"


def write_prompt(root: str | Path, index: int, metadata: dict, images: Iterable[Image.Image]) -> list[Path]:
    """Write one prompt's folder: ``metadata.jsonl`` and ``samples/0000.png``, ...

    Returns the written image paths. Existing samples of that prompt are replaced.
    """
    folder = prompt_dir(root, index)
    samples = folder / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    for old in samples.glob("*.png"):
        old.unlink()
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n", encoding="utf-8")
    paths = []
    for i, image in enumerate(images):
        path = samples / f"{i:04d}.png"
        image.save(path)
        paths.append(path)
    return paths


def write_folder(
    root: str | Path,
    metadata: Sequence[dict],
    make_images: Callable[[int, dict], Iterable[Image.Image]],
) -> Path:
    """Write a whole GenEval folder: prompt ``i`` gets ``make_images(i, metadata[i])``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, line in enumerate(metadata):
        write_prompt(root, i, line, make_images(i, line))
    return root


def read_folder(root: str | Path) -> list[PromptFolder]:
    """Read a GenEval folder, prompts in index order.

    Raises:
        LayoutError: ``root`` is missing or not a folder, holds no prompt folder, or a
            prompt folder lacks ``metadata.jsonl`` / has a bad one / has no PNG sample.
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"not a folder: {root}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    if not folders:
        raise LayoutError(
            f"{root} holds no prompt folders (expected <5-digit index>/metadata.jsonl and samples/*.png)"
        )
    out = []
    for folder in folders:
        meta_path = folder / "metadata.jsonl"
        if not meta_path.is_file():
            raise LayoutError(f"{folder}: missing metadata.jsonl")
        try:
            lines = parse_metadata_lines(meta_path.read_text(encoding="utf-8").splitlines(), str(meta_path))
        except (MetadataError, UnicodeDecodeError) as e:
            raise LayoutError(str(e)) from None
        if len(lines) != 1:
            raise LayoutError(f"{meta_path}: expected exactly one metadata line, found {len(lines)}")
        samples = sorted((folder / "samples").glob("*.png")) if (folder / "samples").is_dir() else []
        if not samples:
            raise LayoutError(f"{folder}: no samples/*.png")
        out.append(PromptFolder(int(folder.name), lines[0], samples))
    return out


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully and return it as RGB, mode ``"RGB"``, uint8.

    Grayscale and palette images are converted; an alpha channel is dropped, as PIL's
    ``convert("RGB")`` in GenEval's evaluator does.

    Raises:
        ImageError: the file is missing, not an image, or truncated.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from None
