"""The built-in dataset: labelled shapes on textured backgrounds, generated deterministically.

The class is the shape alone; colour, scale, position, rotation, background texture and a distractor
blob vary freely, so a model has to learn shape to do well, and a generator has to get every nuisance
factor right too. Image i of a split depends only on (seed, split, i): changing the dataset size never
changes the images already generated.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = (
    "circle",
    "triangle",
    "square",
    "pentagon",
    "star",
    "cross",
    "ring",
    "crescent",
    "arrow",
    "heart",
    "hexagon",
    "diamond",
)
SPLIT_IDS = {"train": 0, "val": 1}
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Style:
    """How much nuisance variation the images carry (the class is always the shape)."""

    scale: tuple[float, float] = (0.28, 0.42)  # shape radius as a fraction of the image side
    bg_saturation: tuple[float, float] = (0.05, 0.35)
    bg_value: tuple[float, float] = (0.3, 0.7)
    textures: int = 5  # texture families used: flat, gradient, stripes, checkerboard, noise
    distractor_p: float = 0.2


STYLE = Style()


def _polygon(name: str) -> np.ndarray:
    """Unit-sized outline (roughly within the unit disc) of a polygonal shape."""
    t = np.linspace(0, 2 * np.pi, 7, endpoint=True)[:-1]
    if name == "triangle":
        a = np.linspace(0, 2 * np.pi, 4)[:-1] - np.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "square":
        return np.array([[-0.72, -0.72], [0.72, -0.72], [0.72, 0.72], [-0.72, 0.72]])
    if name == "pentagon":
        a = np.linspace(0, 2 * np.pi, 6)[:-1] - np.pi / 2
        return np.stack([np.cos(a), np.sin(a)], 1)
    if name == "hexagon":
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "diamond":
        return np.array([[0.0, -1.0], [0.5, 0.0], [0.0, 1.0], [-0.5, 0.0]])
    if name == "star":
        a = np.linspace(0, 2 * np.pi, 11)[:-1] - np.pi / 2
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)
    if name == "cross":
        w = 0.3
        return np.array(
            [
                [-w, -1],
                [w, -1],
                [w, -w],
                [1, -w],
                [1, w],
                [w, w],
                [w, 1],
                [-w, 1],
                [-w, w],
                [-1, w],
                [-1, -w],
                [-w, -w],
            ]
        )
    if name == "arrow":
        return np.array(
            [[-1, -0.25], [0.2, -0.25], [0.2, -0.65], [1, 0], [0.2, 0.65], [0.2, 0.25], [-1, 0.25]]
        )
    if name == "heart":
        s = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        x = 16 * np.sin(s) ** 3
        y = -(13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s))
        return np.stack([x, y], 1) / 17.0
    raise KeyError(name)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, size: int, hue: float, style: Style) -> np.ndarray:
    """A float32 [size, size, 3] texture in one of five families, coloured away from the shape's hue."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c1 = _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(*style.bg_saturation), rng.uniform(*style.bg_value))
    c2 = _hsv(hue + rng.uniform(0.25, 0.75), rng.uniform(*style.bg_saturation), rng.uniform(*style.bg_value))
    kind = rng.integers(style.textures)
    angle = rng.uniform(0, np.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 0:  # flat
        w = np.zeros_like(u)
    elif kind == 1:  # linear gradient
        w = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif kind == 2:  # stripes
        w = (np.sin(2 * np.pi * u * rng.uniform(2, 7) + rng.uniform(0, 6.3)) > 0).astype(np.float32)
    elif kind == 3:  # checkerboard
        n = rng.integers(3, 9)
        w = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(np.float32)
    else:  # smooth low-frequency noise
        coarse = rng.random((5, 5)).astype(np.float32)
        w = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))
        w = np.clip(w, 0, 1)
    img = c1[None, None] * (1 - w[..., None]) + c2[None, None] * w[..., None]
    return img + rng.normal(0, 4.0, img.shape).astype(np.float32)


def render_image(rng: np.random.Generator, label: int, size: int, style: Style = STYLE) -> np.ndarray:
    """Draw one image of class `label` as uint8 [size, size, 3]."""
    shape = SHAPES[label]
    hue = rng.uniform()
    img = _background(rng, size, hue, style)

    big = size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    scale = rng.uniform(*style.scale) * big
    cx, cy = rng.uniform(scale + 2, big - scale - 2, size=2)
    rot = rng.uniform(0, 2 * np.pi)
    if shape in ("circle", "ring", "crescent"):
        sx = scale * (rng.uniform(0.85, 1.0) if shape == "circle" else 1.0)
        draw.ellipse([cx - sx, cy - scale, cx + sx, cy + scale], fill=255)
        if shape == "ring":
            r = scale * rng.uniform(0.45, 0.6)
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=0)
        elif shape == "crescent":
            off = scale * 0.55
            ox, oy = cx + off * math.cos(rot), cy + off * math.sin(rot)
            draw.ellipse([ox - scale * 0.9, oy - scale * 0.9, ox + scale * 0.9, oy + scale * 0.9], fill=0)
    else:
        pts = _polygon(shape) * scale
        c, s = math.cos(rot), math.sin(rot)
        pts = pts @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])
        draw.polygon([tuple(p) for p in pts], fill=255)
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255.0

    colour = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    # Shading across the shape, so its fill is not one flat colour.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    shade = 1.0 + 0.25 * ((xx - 0.5) * math.cos(rot) + (yy - 0.5) * math.sin(rot))
    fg = colour[None, None] * shade[..., None]

    # A small soft distractor blob somewhere, so "the only object" is not a free cue for position.
    if rng.uniform() < style.distractor_p:
        bx, by = rng.uniform(0, size, size=2)
        br = rng.uniform(0.04, 0.09) * size
        blob = np.exp(-(((xx * size - bx) ** 2 + (yy * size - by) ** 2) / (2 * br**2)))[..., None]
        img = img * (1 - 0.7 * blob) + _hsv(rng.uniform(), 0.5, 0.9)[None, None] * 0.7 * blob

    out = img * (1 - alpha) + fg * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))


def generate_images(
    n: int,
    image_size: int,
    seed: int,
    num_classes: int = 10,
    split: str = "train",
    start: int = 0,
    style: Style = STYLE,
) -> tuple[np.ndarray, np.ndarray]:
    """Images start..start+n-1 of a split: (uint8 [n, H, W, 3], int64 [n]); classes balanced round-robin."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [2, {len(SHAPES)}], got {num_classes}")
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    labels = np.arange(start, start + n, dtype=np.int64) % num_classes
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    for j, i in enumerate(range(start, start + n)):
        images[j] = render_image(sample_rng(seed, split, i), int(labels[j]), image_size, style)
    return images, labels


def class_names(num_classes: int) -> list[str]:
    return list(SHAPES[:num_classes])
