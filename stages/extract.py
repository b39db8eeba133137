"""Stage `extract`: the K-Means input — patch features of a seeded sample of the train images, each as one
K-Means view (`extract.view`: a random resized crop + flip seeded by (seed, image), or the stored centre
image) → `data/features.zarr`. Nothing else reads patch features: `tokenize` computes its own.

The store's chunks are independent jobs: a loop here, one Prefect task each in the flow, split over the
ranks under `torchrun --nproc_per_node N python -m stages.extract` (rank 0 creates the store, every rank
writes its own chunks, rank 0 renames it once all are done), with the same bytes for any number of
processes. Resumable: a killed run leaves `<out>.partial`, and the next run with the same settings skips
the chunks already complete.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
from tqdm import tqdm

from pipeline import ranks
from pipeline.config import Params
from pipeline.features import (
    EXTRACT_STREAM,
    CropSpec,
    ExtractSettings,
    StoreSpec,
    ViewPlan,
    create_or_resume,
    extract_chunk,
    fingerprint,
    resolve_workers,
    sample_count,
    shard_layout,
)
from pipeline.io import promote
from pipeline.kmeans import sample_rows
from pipeline.prepare import MANIFEST, read_manifest
from pipeline.stage import MapJobs, stage_main
from pipeline.tokenizer import encoder_from_params, resolve_device

log = logging.getLogger("digit.extract")
PATHS = {"images": "data/images", "out": "data/features.zarr", "metrics": "metrics/extract.json"}


def sampled_images(images: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, labels) of the given train rows; rows follow the image shards in order (manifest columns are
    filtered and sorted in Arrow, so only the sampled rows become Python objects)."""
    table = read_manifest(images).select(["split", "shard", "key", "label"])
    train = table.filter(pc.equal(table["split"], "train")).sort_by(
        [("shard", "ascending"), ("key", "ascending")]
    )
    picked = train.take(rows)
    return np.array(picked["key"].to_pylist(), dtype=str), picked["label"].to_numpy().astype(np.int64)


def directory_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def run(
    params: Params,
    images: str = PATHS["images"],
    out: str = PATHS["out"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    p = params.extract
    encoder = encoder_from_params(params.encoder, params.base)
    layout = shard_layout(images)
    if "train" not in layout:
        raise ValueError(f"{images}: the manifest lists no train images (K-Means is fitted on train)")
    train = layout["train"]
    n_train = train[-1].start + train[-1].count
    rows = sample_rows(n_train, sample_count(p.sample, n_train), p.seed)
    keys, labels = sampled_images(images, rows)
    # At most chunk_images per chunk, balanced: Zarr stores an edge chunk at full size, so 1024 images in
    # chunks of 1000 would take the space of 2000.
    chunks = -(-len(rows) // p.chunk_images)
    spec = StoreSpec(rows, keys, labels, encoder.num_tokens, encoder.dim, -(-len(rows) // chunks))
    plan = ViewPlan(
        count=1,
        centre=1 if p.view == "center" else 0,
        crop=CropSpec(**p.crop.model_dump()),
        seed=p.seed,
        stream=EXTRACT_STREAM,
    )
    desc = encoder.describe()
    attrs: dict[str, Any] = {
        **desc,
        "images_manifest_sha256": hashlib.sha256((Path(images) / MANIFEST).read_bytes()).hexdigest(),
        "sample": {"requested": p.sample, "images": len(rows), "of": n_train, "seed": p.seed},
        "view": {"mode": p.view, **plan.describe()},
        "chunk_images": p.chunk_images,
        "batch_size": p.batch_size,  # fp32 results may differ in the last bits between batch shapes
    }
    attrs["fingerprint"] = fingerprint(attrs)
    partial = Path(out + ".partial")
    workers = resolve_workers(p.workers, encoder.device)
    settings = ExtractSettings(params.encoder, params.base, images, plan, p.batch_size, workers, tuple(train))
    with ranks.process_group(resolve_device(params.base.device)) as (rank, world):
        pending: list[int] | None = None
        if rank == 0:
            group, done = create_or_resume(partial, spec, attrs)
            finished = np.asarray(group["train/chunk_done"][:])
            pending = [c for c in range(spec.chunks) if not finished[c]]
            log.info(
                "extract: %d of %d train images as %s views, %s (%s, layer %d) → [T=%d, D=%d] each, "
                "%d chunk(s)%s%s",
                len(rows),
                n_train,
                p.view,
                desc["encoder"],
                desc["source"],
                desc["layer"],
                encoder.num_tokens,
                encoder.dim,
                spec.chunks,
                f"; resuming, {done} already done" if done else "",
                f"; {world} ranks" if world > 1 else "",
            )
        # A collective: no rank starts before rank 0 has the store ready, and all split the same list.
        pending = ranks.gather(pending)[0]
        mine = ranks.my_block(pending, rank, world)
        job = functools.partial(extract_chunk, settings)
        if map_jobs is not None:
            map_jobs(job, mine, partial)
        else:
            total = sum(min(spec.chunk_images, len(rows) - c * spec.chunk_images) for c in mine)
            with tqdm(total=total, unit="img", desc="extract", mininterval=1.0, disable=rank != 0) as bar:
                for chunk in mine:
                    extract_chunk(settings, chunk, partial, bar.update)
        ranks.barrier()
        if rank == 0:
            promote(partial, out)
    size = directory_bytes(out) if rank == 0 else 0
    return {
        "tokens_per_image": encoder.num_tokens,
        "dim": encoder.dim,
        "sampled_images": len(rows),
        "train_images": n_train,
        "chunks": spec.chunks,
        "chunks_resumed": spec.chunks - len(pending),
        "store_bytes": size,
        "store_bytes_per_image": size / len(rows),
        "view": p.view,
        "encoder_source": desc["source"],
        "layer": desc["layer"],
        "world_size": world,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("extract", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
