"""Pictures of artifacts: labelled image grids written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    row_labels: Sequence[str] | None = None,
    scale: int = 2,
    pad: int = 2,
    title: str | None = None,
) -> Image.Image:
    """Lay out uint8 [H, W, 3] images in rows (rows may differ in length), a label left of each row."""
    cells = [im for row in rows for im in row]
    if not cells:
        raise ValueError("image_grid: no images to draw")
    h, w = cells[0].shape[:2]
    h, w = h * scale, w * scale
    font = ImageFont.load_default()
    label_w = 0
    if row_labels:
        label_w = (
            max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=font)) for s in row_labels)
            + 8
        )
    top = 16 if title else 0
    ncols = max(len(r) for r in rows)
    canvas = Image.new(
        "RGB", (label_w + ncols * (w + pad) + pad, top + len(rows) * (h + pad) + pad), (24, 24, 24)
    )
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(230, 230, 230), font=font)
    for r, row in enumerate(rows):
        y = top + pad + r * (h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 6), row_labels[r], fill=(230, 230, 230), font=font)
        for c, im in enumerate(row):
            tile = Image.fromarray(np.ascontiguousarray(im)).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (w + pad), y))
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path
