"""Image grids people look at: candidates (rows) x steps (columns)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw


def image_grid(
    rows: Sequence[Sequence[Image.Image | None]],
    scale: int = 2,
    pad: int = 2,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Tile images into one RGB image; ``None`` cells stay empty (e.g. a cut path).

    Args:
        rows: a list of rows, each a list of equally sized images (or ``None``).
        scale: integer upscaling (nearest) so that 64 px images are visible.
        row_labels, col_labels: optional short texts drawn left of rows / above columns.
    Raises:
        ValueError: no image at all.
    """
    cells = [im for row in rows for im in row if im is not None]
    if not cells:
        raise ValueError("image_grid needs at least one image")
    w, h = cells[0].size
    w, h = w * scale, h * scale
    ncols = max(len(r) for r in rows)
    left = 70 if row_labels else 0
    top = 14 if col_labels else 0
    grid = Image.new("RGB", (left + ncols * (w + pad) + pad, top + len(rows) * (h + pad) + pad), background)
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = top + pad + r * (h + pad)
        if row_labels:
            draw.text((2, y + h // 2 - 5), row_labels[r][:11], fill=(0, 0, 0))
        for c, im in enumerate(row):
            if im is not None:
                grid.paste(im.convert("RGB").resize((w, h), Image.NEAREST), (left + pad + c * (w + pad), y))
    if col_labels:
        for c, label in enumerate(col_labels):
            draw.text((left + pad + c * (w + pad) + 2, 1), label[:10], fill=(0, 0, 0))
    return grid
