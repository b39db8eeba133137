"""ImageFolder ingest (`root/<class>/<image>`, ImageNet-compatible): scanning, decoding, normalising.

Any image PIL can decode is accepted and converted to 8-bit RGB (grayscale, CMYK, palette, RGBA,
16-bit); files that cannot be used are skipped with a reason instead of failing the whole run.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class SkipImage(Exception):
    """This file cannot be used; the message is the reason written to the skipped-file report."""


@dataclass(frozen=True)
class FolderItem:
    split: str
    path: Path  # absolute
    relpath: str  # relative to the ImageFolder root, for the manifest
    label: int


@dataclass(frozen=True)
class FolderScan:
    classes: list[str]
    items: list[FolderItem]
    empty_classes: list[str]  # "<split>/<class>" folders holding no file at all


def _split_of(relpath: str, val_fraction: float) -> str:
    # Stable under adding/removing other files: the split of a file depends on its own path only.
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def scan_imagefolder(root: str | Path, val_fraction: float) -> FolderScan:
    """List <root>/<class>/<file> (or <root>/{train,val}/<class>/<file>) in a deterministic order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"prepare.root: {root} is not a directory (expected <root>/<class>/<image>)")
    split_dirs = {s: root / s for s in ("train", "val") if (root / s).is_dir()}
    layout = split_dirs if len(split_dirs) == 2 else {"": root}
    class_dirs: dict[str, list[Path]] = {}
    for base in layout.values():
        for d in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
            class_dirs.setdefault(d.name, []).append(d)
    if not class_dirs:
        raise ValueError(
            f"prepare.root: {root} has no class sub-directories (expected <root>/<class>/<image>)"
        )
    classes = sorted(class_dirs)
    items: list[FolderItem] = []
    empty: list[str] = []
    for label, name in enumerate(classes):
        for d in class_dirs[name]:
            # Symlinks that are not regular files (dangling, looping, to a directory) are kept here so that
            # load_image reports them in skipped.csv like any other unusable file.
            files = sorted(
                p for p in d.rglob("*") if (p.is_file() or p.is_symlink()) and not p.name.startswith(".")
            )
            if not files:
                empty.append(str(d.relative_to(root)))
            for f in files:
                rel = f.relative_to(root).as_posix()
                split = d.parent.name if layout is split_dirs else _split_of(rel, val_fraction)
                items.append(FolderItem(split, f, rel, label))
    return FolderScan(classes, items, empty)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: PIL's convert("L") clips instead of rescaling, so scale by hand.
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im)
    return im.convert("RGB")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then crop the centre square (the ImageNet eval transform)."""
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def load_image(path: str | Path, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(uint8 [size, size, 3], original (w, h)); raises SkipImage with the reason if unusable."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise SkipImage(f"dangling symlink (its target {os.readlink(path)!r} does not exist or loops)")
    if not path.is_file():
        raise SkipImage("not a regular file (a symlink to a directory is not followed)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()  # decode fully now: truncated files fail here, not later
                orig = im.size
                rgb = _to_rgb(im)
    except UnidentifiedImageError:
        raise SkipImage("not an image PIL can identify") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        reason = str(e) or type(e).__name__
        raise SkipImage(f"cannot decode: {reason}") from None
    if min(orig) < 1:
        raise SkipImage(f"empty image {orig}")
    return np.asarray(resize_center_crop(rgb, size), dtype=np.uint8), orig
