"""WebDataset shards: deterministic writing and streaming reading.

Shards are plain tar files named `<split>-%05d.tar`. A sample is a group of members sharing a
`__key__` (no dots in it): `png` (image), `cls` (label as ASCII), `digit.npy` / `vq.npy` (token grids).
Writing fixes every tar header field and the PNG encoder settings, so the same samples give
byte-identical shards.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


class ShardError(RuntimeError):
    pass


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.tar"


def list_shards(directory: str | Path, split: str) -> list[Path]:
    directory = Path(directory)
    shards = sorted(directory.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9].tar"))
    if not shards:
        raise ShardError(f"{directory}: no '{split}-NNNNN.tar' shards found (has the producing stage run?)")
    return shards


def encode_png(image: np.ndarray) -> bytes:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {list(image.shape)}")
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_sample(key: str, fields: dict[str, Any]) -> dict[str, bytes | str]:
    """Turn python values into member bytes by extension: png ← uint8 image, *.npy ← array, cls ← int."""
    if not KEY_RE.match(key):
        raise ValueError(
            f"sample key {key!r}: only letters, digits, '_', '-', '/' allowed (WebDataset splits on dots)"
        )
    out: dict[str, bytes | str] = {"__key__": key}
    for ext, value in fields.items():
        if isinstance(value, bytes):
            out[ext] = value
        elif ext == "png":
            out[ext] = encode_png(value)
        elif ext.endswith("npy"):
            out[ext] = encode_npy(value)
        elif ext == "cls":
            out[ext] = str(int(value)).encode()
        elif isinstance(value, str):
            out[ext] = value.encode()
        else:
            raise ValueError(
                f"sample {key}: don't know how to encode field {ext!r} of type {type(value).__name__}"
            )
    return out


def write_shard(path: str | Path, samples: Iterable[tuple[str, dict[str, Any]]]) -> int:
    """Write (key, fields) samples to `path` atomically; returns the number written."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    n = 0
    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0, user="digit", group="digit", mode=0o444)
            for key, fields in samples:
                writer.write(encode_sample(key, fields))
                n += 1
            writer.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return n


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"__key__": raw["__key__"], "__url__": raw.get("__url__")}
    for ext, value in raw.items():
        if ext.startswith("__"):
            continue
        if ext == "png":
            out["png"] = decode_png(value)
        elif ext.endswith("npy"):
            out[ext] = decode_npy(value)
        elif ext == "cls":
            out["cls"] = int(value)
        else:
            out[ext] = value
    return out


# Callers pass exactly the shards they want, in order: no shuffling, and no splitting of the list by
# torch.distributed rank or DataLoader worker (ranks take their own shards; see pipeline/ranks.py).
_READ_ALL = {"shardshuffle": False, "empty_check": False, "nodesplitter": None, "workersplitter": None}


def iter_samples(shards: Iterable[str | Path], decode: bool = True) -> Iterator[dict[str, Any]]:
    """Stream samples from shards in order; memory stays constant whatever the dataset size."""
    urls = [str(s) for s in shards]
    for shard in urls:
        if not os.path.isfile(shard):
            raise ShardError(f"{shard}: shard file not found")
    dataset = wds.WebDataset(urls, **_READ_ALL)
    for raw in dataset:
        yield decode_sample(raw) if decode else raw


def count_samples(shard: str | Path) -> int:
    return sum(1 for _ in wds.WebDataset([str(shard)], **_READ_ALL))
