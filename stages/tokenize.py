"""Stage `tokenize`: DiGIT tokens (nearest centroid of every patch feature) and pixel-VQ tokens of every
image → token WebDataset shards.

Each image shard `<split>-NNNNN.tar` gets a token shard of the same name and keys holding
`digit.npy` (uint16 [h, w], raster order), `vq.npy` (uint16 [h', w']) and `cls`; `meta.json` records
both vocabularies, grids and the class names.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from pipeline.assign import assign
from pipeline.config import Params
from pipeline.features import ShardRows, layout_from_store, open_features
from pipeline.io import atomic_dir, write_json
from pipeline.kmeans import cluster_usage
from pipeline.pixel_vq import load_pixel_vq, to_model_range
from pipeline.prepare import manifest_classes, read_manifest
from pipeline.shards import iter_samples, write_shard
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import TOKEN_META
from pipeline.tokenizer import load_centroids

log = logging.getLogger("digit.tokenize")
PATHS = {
    "features": "data/features.zarr",
    "kmeans": "models/kmeans",
    "images": "data/images",
    "vq": "models/vq",
    "out": "data/tokens",
    "metrics": "metrics/tokenize.json",
}


def tokenize_block(
    store, block: ShardRows, centroids: torch.Tensor, grid: tuple[int, int], batch: int
) -> np.ndarray:
    """Token ids (uint16 [n, h, w]) of one shard's rows, read from the feature store in batches."""
    patches = store[f"{block.split}/patches"]
    out = np.empty((block.count, *grid), dtype=np.uint16)
    for i in range(0, block.count, batch):
        rows = slice(block.start + i, block.start + min(i + batch, block.count))
        feats = torch.from_numpy(np.asarray(patches[rows], dtype=np.float32))
        out[i : i + feats.shape[0]] = assign(feats, centroids).reshape(-1, *grid).numpy().astype(np.uint16)
    return out


def vq_block(vq, images_dir: str | Path, block: ShardRows, keys: np.ndarray, batch: int) -> np.ndarray:
    """Pixel-VQ token ids (uint16 [n, h', w']) of one image shard, in the feature store's key order."""
    out, pending, seen = [], [], []

    def flush() -> None:
        with torch.inference_mode():
            out.append(vq.encode(to_model_range(np.stack(pending))).numpy().astype(np.uint16))
        pending.clear()

    for s in iter_samples([Path(images_dir) / block.shard]):
        seen.append(s["__key__"])
        pending.append(s["png"])
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    if seen != [str(k) for k in keys]:
        raise ValueError(f"{images_dir}/{block.shard}: keys differ from the feature store's; rerun extract")
    return np.concatenate(out)


def _usage(counts: np.ndarray, cells: int, prefix: str) -> dict[str, Any]:
    _, entropy, dead = cluster_usage(np.repeat(np.arange(len(counts)), counts), len(counts))
    return {
        f"{prefix}_images": int(counts.sum() // cells),
        f"{prefix}_usage_entropy_bits": entropy,
        f"{prefix}_unused_tokens": dead,
    }


def run(
    params: Params,
    features: str = PATHS["features"],
    kmeans: str = PATHS["kmeans"],
    images: str = PATHS["images"],
    vq: str = PATHS["vq"],
    out: str = PATHS["out"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    store = open_features(features)
    centroids_np, _ = load_centroids(kmeans)
    dim = store["train/patches"].shape[2]
    if centroids_np.shape[1] != dim:
        raise ValueError(f"{kmeans}/centroids.npy has D={centroids_np.shape[1]} but {features} has D={dim}")
    centroids = torch.from_numpy(centroids_np)
    vq_model = load_pixel_vq(vq)
    grid = tuple(store.attrs["grid"])
    size = params.base.image_size
    vq_grid = tuple(vq_model.token_shape(size, size))
    layout = layout_from_store(store)
    blocks = [b for split in layout.values() for b in split]
    k, v = centroids.shape[0], vq_model.codebook_size
    batch = params.tokenize.batch_size

    def job(block: ShardRows, out_dir: Path) -> tuple[np.ndarray, np.ndarray]:
        tokens = tokenize_block(store, block, centroids, grid, batch)
        keys = store[f"{block.split}/keys"][block.start : block.start + block.count]
        labels = store[f"{block.split}/labels"][block.start : block.start + block.count]
        vq_tokens = vq_block(vq_model, images, block, keys, batch)
        write_shard(
            Path(out_dir) / block.shard,
            (
                (str(key), {"digit.npy": tokens[i], "vq.npy": vq_tokens[i], "cls": int(labels[i])})
                for i, key in enumerate(keys)
            ),
        )
        return (
            np.bincount(tokens.ravel().astype(np.int64), minlength=k),
            np.bincount(vq_tokens.ravel().astype(np.int64), minlength=v),
        )

    with atomic_dir(out) as tmp:
        if map_jobs is not None:
            counts = map_jobs(job, blocks, tmp)
        else:
            counts = [job(b, tmp) for b in tqdm(blocks, desc="tokenize", unit="shard")]
        classes = manifest_classes(read_manifest(images))
        write_json(
            Path(tmp) / TOKEN_META,
            {
                "digit": {"field": "digit.npy", "vocab": k, "grid": list(grid)},
                "vq": {"field": "vq.npy", "vocab": v, "grid": list(vq_grid)},
                "num_classes": len(classes),
                "classes": classes,
            },
        )
    summary: dict[str, Any] = {
        "k": k,
        "grid_h": grid[0],
        "grid_w": grid[1],
        "vq_vocab": v,
        "vq_grid_h": vq_grid[0],
        "vq_grid_w": vq_grid[1],
    }
    for split in layout:
        digit_c = sum(c[0] for b, c in zip(blocks, counts, strict=True) if b.split == split)
        vq_c = sum(c[1] for b, c in zip(blocks, counts, strict=True) if b.split == split)
        summary.update(_usage(digit_c, grid[0] * grid[1], split))
        summary.update(
            {
                k_.replace(f"{split}_", f"{split}_vq_"): val
                for k_, val in _usage(vq_c, vq_grid[0] * vq_grid[1], split).items()
                if "images" not in k_
            }
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenize", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
