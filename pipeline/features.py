"""The patch-feature store (`data/features.zarr`) and the per-shard extraction that fills it.

Layout (Zarr v3), one group per split:
  <split>/patches   float16 [N, T, D], chunked by image shard (shard_size images per chunk)
  <split>/labels    int64 [N]
  <split>/keys      str [N]            (the image shards' `__key__`s, same order)
  <split>/shard_done uint8 [n_shards]  (1 once a shard's rows are written: what resume skips)
Root attributes: the encoder's description (name, source, layer, img size, weights sha256, grid, dim)
and a fingerprint of everything that determines the values, so a resumed run never mixes two configs.

Rows of a split follow the image shards in order, so shard s covers a contiguous block of rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.prepare import SPLITS, read_manifest
from pipeline.shards import iter_samples

log = logging.getLogger(__name__)
_WRITE_LOCK = threading.Lock()  # shards of one split may share a chunk when an ImageFolder skipped files


@dataclass(frozen=True)
class ShardRows:
    """One image shard = a contiguous block of rows of its split."""

    split: str
    index: int  # position of the shard within its split
    shard: str  # file name
    start: int
    count: int


def layout_to_json(layout: dict[str, list[ShardRows]]) -> dict[str, list[list]]:
    return {split: [[b.shard, b.start, b.count] for b in blocks] for split, blocks in layout.items()}


def layout_from_store(group: zarr.Group) -> dict[str, list[ShardRows]]:
    """The row blocks recorded in a feature store (so readers need not open the image manifest)."""
    return {
        split: [ShardRows(split, i, name, start, count) for i, (name, start, count) in enumerate(blocks)]
        for split, blocks in group.attrs["shards"].items()
    }


def shard_layout(images_dir: str | Path) -> dict[str, list[ShardRows]]:
    """Row blocks of every split, from the images manifest."""
    table = read_manifest(images_dir).select(["split", "shard"]).to_pylist()
    layout: dict[str, list[ShardRows]] = {}
    for split in SPLITS:
        counts: dict[str, int] = {}
        for r in table:
            if r["split"] == split:
                counts[r["shard"]] = counts.get(r["shard"], 0) + 1
        start, blocks = 0, []
        for i, name in enumerate(sorted(counts)):
            blocks.append(ShardRows(split, i, name, start, counts[name]))
            start += counts[name]
        if blocks:
            layout[split] = blocks
    return layout


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def create_or_resume(
    path: str | Path,
    layout: dict[str, list[ShardRows]],
    tokens: int,
    dim: int,
    chunk_images: int,
    attrs: dict[str, Any],
) -> tuple[zarr.Group, int]:
    """Open `path` to continue a run with the same fingerprint, else (re)create it empty.

    Returns the group and the number of shards already complete.
    """
    path = Path(path)
    fp = attrs["fingerprint"]
    if path.exists():
        try:
            group = zarr.open_group(str(path), mode="r+")
            if group.attrs.get("fingerprint") == fp:
                done = sum(int(np.asarray(group[f"{s}/shard_done"][:]).sum()) for s in layout)
                return group, done
            log.info("%s: left by a run with other settings; starting over", path)
        except (FileNotFoundError, KeyError, ValueError) as e:
            log.info("%s: unreadable partial store (%s); starting over", path, e)
        shutil.rmtree(path)
    group = zarr.open_group(str(path), mode="w")
    for split, blocks in layout.items():
        n = blocks[-1].start + blocks[-1].count
        g = group.create_group(split)
        # float16 features barely compress (zstd: ~92%), so chunks are stored raw: cheaper to write and read.
        g.create_array(
            "patches",
            shape=(n, tokens, dim),
            chunks=(chunk_images, tokens, dim),
            dtype="float16",
            compressors=None,
        )
        g.create_array("labels", shape=(n,), chunks=(chunk_images,), dtype="int64")
        g.create_array("keys", shape=(n,), chunks=(chunk_images,), dtype=str)
        g.create_array("shard_done", shape=(len(blocks),), chunks=(1,), dtype="uint8", fill_value=0)
        g.attrs["num_images"] = n
    group.attrs.update({**attrs, "shards": layout_to_json(layout)})
    return group, 0


def extract_shard(
    group: zarr.Group,
    block: ShardRows,
    images_dir: str | Path,
    features: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Encode one image shard into its rows; returns False if it was already complete."""
    g = group[block.split]
    if g["shard_done"][block.index]:
        return False
    feats = np.empty((block.count, *g["patches"].shape[1:]), dtype=np.float16)
    labels = np.empty(block.count, dtype=np.int64)
    keys: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        i = len(keys) - len(batch)
        feats[i : i + len(batch)] = features(np.stack(batch)).astype(np.float16)
        if progress:
            progress(len(batch))
        batch.clear()

    for sample in iter_samples([Path(images_dir) / block.shard]):
        labels[len(keys)] = sample["cls"]
        keys.append(sample["__key__"])
        batch.append(sample["png"])
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if len(keys) != block.count:
        raise RuntimeError(
            f"{block.shard}: manifest lists {block.count} images but the shard holds {len(keys)}"
        )
    rows = slice(block.start, block.start + block.count)
    with _WRITE_LOCK:
        g["patches"][rows] = feats
        g["labels"][rows] = labels
        g["keys"][rows] = np.array(keys)
        g["shard_done"][block.index] = 1  # last: a kill before this line redoes the shard
    return True


def open_features(path: str | Path) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: feature store not found (run the extract stage first)")
    return zarr.open_group(str(path), mode="r")
