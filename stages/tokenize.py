"""Stage `tokenize`: DiGIT tokens and pixel-VQ tokens of V views of every image → token WebDataset shards.

Images → encoder (fp32, block `encoder.layer` through the final norm) → exact nearest centroid, fused and
batched on `base.device`, fed by a DataLoader (`tokenize.workers` processes decode the PNGs and cut the
views); the pixel VQ encodes the same views on the same device. View 0 is the stored (centre) image;
views 1..V-1 (`tokenize.views`) are random resized crops + flips seeded by (seed, image, view), the same
pixels for both tokenizers.

Each image shard `<split>-NNNNN.tar` gets a token shard of the same name and keys holding `digit.npy`
(uint16 [h, w], view 0, raster order), `vq.npy` (uint16 [h', w'], view 0), `cls`, and for V > 1
`digit_views.npy` / `vq_views.npy` (uint16 [V-1, ...], views 1..V-1); `meta.json` records both
vocabularies, grids, V and the class names.

Shards are independent jobs: a loop here, one Prefect task each in the flow, split over the ranks under
`torchrun --nproc_per_node N python -m stages.tokenize` (every rank writes its own shards, rank 0 writes
meta.json and renames the result once all are done), byte-identical for any number of processes.
Resumable: a killed run leaves `<out>.partial`, and the next run with the same inputs and settings keeps
the shards already written.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline import ranks
from pipeline.checkpoint import checkpoint_sha256
from pipeline.config import Base, Params
from pipeline.config import Encoder as EncoderParams
from pipeline.encoders import Encoder
from pipeline.features import (
    TOKENIZE_STREAM,
    CropSpec,
    ImageViews,
    ShardRows,
    ViewPlan,
    fingerprint,
    resolve_workers,
    shard_items,
    shard_layout,
    view_loader,
)
from pipeline.io import promote, sha256_file, write_json
from pipeline.kmeans import cluster_usage
from pipeline.prepare import MANIFEST, manifest_classes, read_manifest
from pipeline.shards import write_shard
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import TOKEN_META
from pipeline.tokenizer import (
    DigitTokenizer,
    centroids_on,
    encoder_from_params,
    load_centroids,
    pixel_vq_on,
    tokenize_views,
)

log = logging.getLogger("digit.tokenize")
PATHS = {
    "kmeans": "models/kmeans",
    "images": "data/images",
    "vq": "models/vq",
    "out": "data/tokens",
    "metrics": "metrics/tokenize.json",
}
COUNTS = ".counts"  # per-shard token counts while the run is going (removed before the rename)
FINGERPRINT = ".fingerprint.json"  # what the partial output was made from (removed before the rename)
# Encoder attributes that must match between the features the centroids were fitted on and the encoder.
MATCHING = ("encoder", "source", "layer", "block_index", "img_size", "patch_size", "dim", "weights_sha256")


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything a shard job needs, small and picklable: models are loaded per process, keyed on hashes."""

    encoder: EncoderParams
    base: Base
    encoder_sha256: str
    centroids: str
    centroids_sha256: str
    vq: str
    vq_sha256: str
    images: str
    plan: ViewPlan
    batch_size: int
    workers: int


def _counts_path(out_dir: Path, block: ShardRows) -> Path:
    return out_dir / COUNTS / f"{Path(block.shard).stem}.npz"


def token_fields(digit: np.ndarray, vq: np.ndarray, label: int) -> dict[str, Any]:
    """One token sample's fields from its V views' grids (view 0 first): the layout of data/README.md."""
    fields: dict[str, Any] = {"digit.npy": digit[0], "vq.npy": vq[0]}
    if len(digit) > 1:
        fields["digit_views.npy"] = digit[1:]
        fields["vq_views.npy"] = vq[1:]
    fields["cls"] = label
    return fields


def tokenize_shard(
    settings: TokenizeSettings,
    block: ShardRows,
    out_dir: str | Path,
    progress: Any = None,
) -> bool:
    """Tokenize every view of one image shard into `<out_dir>/<shard>`; False if it was already there.

    A module-level job (the map_jobs contract of pipeline/stage.py): encoder, centroids and VQ come from
    per-process caches. The shard's token counts (view 0) go to `<out_dir>/.counts/` before the shard
    itself, so a shard file on disk always has its counts.
    """
    out_dir = Path(out_dir)
    counts_path = _counts_path(out_dir, block)
    if (out_dir / block.shard).is_file() and counts_path.is_file():
        return False
    encoder = encoder_from_params(settings.encoder, settings.base, settings.encoder_sha256)
    device = encoder.device
    tokenizer = DigitTokenizer(encoder, centroids_on(settings.centroids, settings.centroids_sha256, device))
    vq = pixel_vq_on(settings.vq, settings.vq_sha256, device)
    entries, items = shard_items(settings.images, block)
    dataset = ImageViews(items, settings.plan, settings.base.image_size)
    digit, pixel = [], []
    for views in view_loader(dataset, settings.batch_size, settings.workers, device):
        d, v = tokenize_views(tokenizer, vq, views)
        digit.append(d.cpu().numpy().astype(np.uint16))
        pixel.append(v.cpu().numpy().astype(np.uint16))
        if progress:
            progress(views.shape[1])
    digit_all, pixel_all = np.concatenate(digit), np.concatenate(pixel)
    counts_path.parent.mkdir(exist_ok=True)
    tmp = counts_path.with_name(counts_path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            digit=np.bincount(digit_all[:, 0].ravel(), minlength=tokenizer.centroids.shape[0]),
            vq=np.bincount(pixel_all[:, 0].ravel(), minlength=vq.codebook_size),
        )
    os.replace(tmp, counts_path)
    write_shard(
        out_dir / block.shard,
        ((e.key, token_fields(digit_all[i], pixel_all[i], e.label)) for i, e in enumerate(entries)),
    )
    return True


def _describe(encoder: Encoder) -> str:
    d = encoder.describe()
    return f"encoder '{d['encoder']}' (source {d['source']}{', ' + d['weights'] if d['weights'] else ''})"


def check_codebook(centroids: np.ndarray, meta: dict[str, Any], kmeans: str, encoder: Encoder) -> None:
    """The centroids must live in the encoder's feature space: same D, and (when kmeans.json says what they
    were fitted on) the same encoder, layer, input size and weights."""
    path = Path(kmeans) / "centroids.npy"
    if centroids.ndim != 2 or centroids.shape[1] != encoder.dim:
        raise ValueError(
            f"{path} has shape {list(centroids.shape)} (D={centroids.shape[-1]}) but {_describe(encoder)} "
            f"gives patch features [T={encoder.num_tokens}, D={encoder.dim}]: rerun extract and kmeans "
            "with this encoder"
        )
    if centroids.shape[0] > 65535:
        raise ValueError(f"{path}: K={centroids.shape[0]} centroids do not fit the uint16 token shards")
    fitted, desc = meta.get("encoder") or {}, encoder.describe()
    diff = [f"{k} {fitted[k]!r} vs {desc[k]!r}" for k in MATCHING if k in fitted and fitted[k] != desc[k]]
    if diff:
        raise ValueError(
            f"{Path(kmeans) / 'kmeans.json'}: the centroids were fitted on features of another encoder than "
            f"{_describe(encoder)} ({'; '.join(diff)}): rerun extract and kmeans with this encoder"
        )


def _start(partial: Path, stamp: dict[str, Any], blocks: list[ShardRows]) -> list[int]:
    """Keep a partial output made from the same inputs (else start over); the jobs still to do."""
    marker = partial / FINGERPRINT
    if partial.exists():
        same = marker.is_file() and json.loads(marker.read_text()) == stamp
        if not same:
            log.info("%s: left by a run with other inputs or settings; starting over", partial)
            shutil.rmtree(partial)
    if not partial.exists():
        partial.mkdir(parents=True)
        write_json(marker, stamp)
    pending = [
        i
        for i, b in enumerate(blocks)
        if not ((partial / b.shard).is_file() and _counts_path(partial, b).is_file())
    ]
    if len(pending) < len(blocks):
        log.info("tokenize: resuming, %d of %d shards already done", len(blocks) - len(pending), len(blocks))
    return pending


def _usage(counts: np.ndarray, cells: int, prefix: str) -> dict[str, Any]:
    _, entropy, dead = cluster_usage(np.repeat(np.arange(len(counts)), counts), len(counts))
    return {
        f"{prefix}_images": int(counts.sum() // cells),
        f"{prefix}_usage_entropy_bits": entropy,
        f"{prefix}_unused_tokens": dead,
    }


def _finish(
    partial: Path,
    out: str,
    layout: dict[str, list[ShardRows]],
    meta: dict[str, Any],
    cells: tuple[int, int],
) -> dict[str, Any]:
    """Sum the per-shard counts, write meta.json, drop the run's bookkeeping and rename into place."""
    summary: dict[str, Any] = {}
    for split, blocks in layout.items():
        digit, vq = 0, 0
        for b in blocks:
            with np.load(_counts_path(partial, b)) as c:
                digit, vq = digit + c["digit"], vq + c["vq"]
        summary.update(_usage(digit, cells[0], split))
        vq_usage = _usage(vq, cells[1], split)
        summary[f"{split}_vq_usage_entropy_bits"] = vq_usage[f"{split}_usage_entropy_bits"]
        summary[f"{split}_vq_unused_tokens"] = vq_usage[f"{split}_unused_tokens"]
    write_json(partial / TOKEN_META, meta)
    shutil.rmtree(partial / COUNTS)
    (partial / FINGERPRINT).unlink()
    promote(partial, out)
    return summary


def run(
    params: Params,
    kmeans: str = PATHS["kmeans"],
    images: str = PATHS["images"],
    vq: str = PATHS["vq"],
    out: str = PATHS["out"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    p = params.tokenize
    encoder = encoder_from_params(params.encoder, params.base)
    centroids, kmeans_meta = load_centroids(kmeans)
    check_codebook(centroids, kmeans_meta, kmeans, encoder)
    device = encoder.device
    vq_sha = checkpoint_sha256(vq)
    vq_model = pixel_vq_on(vq, vq_sha, device)
    size = params.base.image_size
    grid, vq_grid = encoder.grid, tuple(vq_model.token_shape(size, size))
    k, v = int(centroids.shape[0]), int(vq_model.codebook_size)
    plan = ViewPlan(
        count=p.views, centre=1, crop=CropSpec(**p.crop.model_dump()), seed=p.seed, stream=TOKENIZE_STREAM
    )
    centroids_path = str(Path(kmeans) / "centroids.npy")
    settings = TokenizeSettings(
        params.encoder,
        params.base,
        encoder.weights_sha256,
        centroids_path,
        sha256_file(centroids_path),
        vq,
        vq_sha,
        images,
        plan,
        p.batch_size,
        resolve_workers(p.workers, device),
    )
    layout = shard_layout(images)
    blocks = [b for split in layout.values() for b in split]
    stamp = {
        "encoder": encoder.describe(),
        "centroids_sha256": settings.centroids_sha256,
        "vq_sha256": vq_sha,
        "images_manifest_sha256": sha256_file(Path(images) / MANIFEST),
        "image_size": size,
        "view": plan.describe(),
        "batch_size": p.batch_size,  # fp32 features may differ in the last bits between batch shapes
    }
    stamp["fingerprint"] = fingerprint(stamp)
    classes = manifest_classes(read_manifest(images))
    views_field = {"digit": "digit_views.npy", "vq": "vq_views.npy"} if p.views > 1 else {}
    meta = {
        "digit": {"field": "digit.npy", "vocab": k, "grid": list(grid)},
        "vq": {"field": "vq.npy", "vocab": v, "grid": list(vq_grid)},
        "views": p.views,
        "view": plan.describe(),
        "num_classes": len(classes),
        "classes": classes,
    }
    for name, f in views_field.items():
        meta[name]["views_field"] = f
    partial = Path(out + ".partial")
    with ranks.process_group(device) as (rank, world):
        pending: list[int] | None = None
        if rank == 0:
            pending = _start(partial, stamp, blocks)
            log.info(
                "tokenize: %d images × %d view(s) on %s, %s → %s tokens (K=%d), VQ %s (V=%d)%s",
                sum(b.count for b in blocks),
                p.views,
                device,
                _describe(encoder),
                "×".join(map(str, grid)),
                k,
                "×".join(map(str, vq_grid)),
                v,
                f"; {world} ranks" if world > 1 else "",
            )
        # A collective: no rank starts before rank 0 has the partial dir ready, and all split the same list.
        pending = ranks.gather(pending)[0]
        mine = ranks.my_block([blocks[i] for i in pending], rank, world)
        job = functools.partial(tokenize_shard, settings)
        if map_jobs is not None:
            map_jobs(job, mine, partial)
        else:
            total = sum(b.count for b in mine)
            with tqdm(total=total, unit="img", desc="tokenize", mininterval=1.0, disable=rank != 0) as bar:
                for block in mine:
                    tokenize_shard(settings, block, partial, bar.update)
        ranks.barrier()
        summary: dict[str, Any] = {}
        if rank == 0:
            summary = _finish(partial, out, layout, meta, (grid[0] * grid[1], vq_grid[0] * vq_grid[1]))
    return {
        "k": k,
        "grid_h": grid[0],
        "grid_w": grid[1],
        "vq_vocab": v,
        "vq_grid_h": vq_grid[0],
        "vq_grid_w": vq_grid[1],
        "views": p.views,
        "shards": len(blocks),
        "shards_resumed": len(blocks) - len(pending),
        "device": str(device),
        "world_size": world,
        **summary,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("tokenize", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
