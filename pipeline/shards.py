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
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import Dataset

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
        return np.array(im.convert("RGB"), dtype=np.uint8)


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


class ShardImages(Dataset):
    """The images of WebDataset shards as a map-style Dataset of uint8 tensors [3, H, W] (torch-fidelity's
    input), read on demand: memory does not grow with the number of images.

    Building it reads the tar headers (and the tiny `cls` members) of every shard once; an item is then one
    seek and one PNG decode. `indices` (positions in the shards' concatenation, e.g. from
    pipeline.evaluation.subset_indices) restricts it to a subset, in the given order. `labels` and `keys`
    are those of the kept items.
    """

    def __init__(self, shards: Iterable[str | Path], indices: Sequence[int] | np.ndarray | None = None):
        self.shards = [str(s) for s in shards]
        if not self.shards:
            raise ShardError("ShardImages: no shards given")
        where, offsets, sizes, labels, keys = [], [], [], [], []
        for s, path in enumerate(self.shards):
            if not os.path.isfile(path):
                raise ShardError(f"{path}: shard file not found")
            with tarfile.open(path) as tar:
                found: dict[str, dict[str, Any]] = {}
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    entry = found.setdefault(key, {})
                    if ext == "png":
                        entry["png"] = (member.offset_data, member.size)
                    elif ext == "cls":
                        entry["cls"] = int(tar.extractfile(member).read())
                for key, entry in found.items():
                    if "png" not in entry:
                        continue
                    where.append(s)
                    offsets.append(entry["png"][0])
                    sizes.append(entry["png"][1])
                    labels.append(entry.get("cls", -1))
                    keys.append(key)
        keep = np.arange(len(keys)) if indices is None else np.asarray(indices, dtype=np.int64)
        if len(keep) and (keep.min() < 0 or keep.max() >= len(keys)):
            raise ShardError(f"ShardImages: indices must lie in [0, {len(keys)}), the images in the shards")
        self.total = len(keys)
        self._shard = np.asarray(where, dtype=np.int32)[keep]
        self._offset = np.asarray(offsets, dtype=np.int64)[keep]
        self._size = np.asarray(sizes, dtype=np.int64)[keep]
        self.labels = np.asarray(labels, dtype=np.int64)[keep]
        self.keys = [keys[i] for i in keep]
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._offset)

    def read_png(self, i: int) -> bytes:
        s = int(self._shard[i])
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self.shards[s], "rb")  # noqa: SIM115 (kept open for the next reads)
        f.seek(int(self._offset[i]))
        return f.read(int(self._size[i]))

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(decode_png(self.read_png(i))).permute(2, 0, 1).contiguous()

    def __getstate__(self) -> dict[str, Any]:
        # open files do not travel to DataLoader workers: each process opens its own
        return {**self.__dict__, "_files": {}}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class ShardSink:
    """Write samples one at a time into `<directory>/<split>-NNNNN.tar` shards of `shard_size` samples.

    Each shard is written as `<name>.partial` and renamed when it is complete (`close` finishes the last,
    shorter one), so a shard file that exists is whole. Byte-identical for the same samples (write_shard's
    fixed headers)."""

    def __init__(self, directory: str | Path, split: str, shard_size: int) -> None:
        if shard_size < 1:
            raise ValueError(f"ShardSink: shard_size must be >= 1, got {shard_size}")
        self.directory, self.split, self.shard_size = Path(directory), split, shard_size
        self.directory.mkdir(parents=True, exist_ok=True)
        self.shards = 0
        self._pending: list[tuple[str, dict[str, Any]]] = []

    def write(self, key: str, fields: dict[str, Any]) -> None:
        self._pending.append((key, encode_sample(key, fields)))
        if len(self._pending) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            encoded = [(key, {k: v for k, v in s.items() if k != "__key__"}) for key, s in self._pending]
            write_shard(self.directory / shard_name(self.split, self.shards), encoded)
            self.shards += 1
            self._pending = []

    def close(self) -> None:
        self._flush()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
