"""The `prepare` step as independent per-shard jobs (so DVC runs them in a loop and Prefect in parallel),
plus the final manifest and skipped-file report."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import synthetic
from pipeline.config import Params
from pipeline.imagefolder import FolderItem, SkipImage, load_image, scan_imagefolder
from pipeline.shards import encode_png, shard_name, write_shard

MANIFEST = "manifest.parquet"
SKIPPED = "skipped.csv"
SPLITS = ("train", "val")

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("split", pa.string()),
        ("label", pa.int64()),
        ("class_name", pa.string()),
        ("shard", pa.string()),
        ("source", pa.string()),
        ("sha256", pa.string()),
        ("w", pa.int32()),
        ("h", pa.int32()),
    ]
)


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    classes: tuple[str, ...]
    image_size: int
    seed: int = 0
    start: int = 0  # built-in data: first image index of this shard
    count: int = 0
    files: tuple[FolderItem, ...] = ()  # imagefolder: the files of this shard

    @property
    def name(self) -> str:
        return shard_name(self.split, self.index)

    @property
    def size(self) -> int:
        return len(self.files) if self.files else self.count


@dataclass
class ShardResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)


@dataclass(frozen=True)
class Plan:
    jobs: list[ShardJob]
    classes: list[str]
    empty_classes: list[str]


def plan(params: Params) -> Plan:
    p, b = params.prepare, params.base
    jobs: list[ShardJob] = []
    if p.source == "builtin":
        classes = synthetic.class_names(b.num_classes)
        for split, n in (("train", p.train_size), ("val", p.val_size)):
            for i, start in enumerate(range(0, n, p.shard_size)):
                count = min(p.shard_size, n - start)
                jobs.append(ShardJob(split, i, tuple(classes), b.image_size, b.seed, start, count))
        return Plan(jobs, classes, [])
    scan = scan_imagefolder(p.root, p.val_fraction)
    for split in SPLITS:
        items = [it for it in scan.items if it.split == split]
        # A folder lists one class after another; shuffling before sharding (seeded) mixes classes within
        # every shard, so shard-level streaming gives mixed-class batches.
        order = np.random.default_rng([b.seed, SPLITS.index(split)]).permutation(len(items))
        items = [items[i] for i in order]
        for i, start in enumerate(range(0, len(items), p.shard_size)):
            chunk = tuple(items[start : start + p.shard_size])
            jobs.append(ShardJob(split, i, tuple(scan.classes), b.image_size, start=start, files=chunk))
    return Plan(jobs, scan.classes, scan.empty_classes)


def _png_sha(png: bytes) -> str:
    return hashlib.sha256(png).hexdigest()


def run_job(job: ShardJob, out_dir: str | Path, progress: Callable[[int], None] | None = None) -> ShardResult:
    """Write one shard into out_dir; returns its manifest rows and skipped files."""
    result = ShardResult()

    def samples():
        if job.files:
            for j, item in enumerate(job.files):
                try:
                    image, (w, h) = load_image(item.path, job.image_size)
                except SkipImage as e:
                    result.skipped.append((item.relpath, str(e)))
                    if progress:
                        progress(1)
                    continue
                yield job.start + j, image, item.label, item.relpath, w, h
        else:
            images, labels = synthetic.generate_images(
                job.count, job.image_size, job.seed, len(job.classes), job.split, job.start
            )
            for j in range(job.count):
                source = f"builtin:{job.split}/{job.start + j}"
                yield job.start + j, images[j], int(labels[j]), source, job.image_size, job.image_size

    def encoded():
        for index, image, label, source, w, h in samples():
            key = f"{job.split}_{index:07d}"
            png = encode_png(image)
            result.rows.append(
                dict(
                    key=key,
                    split=job.split,
                    label=label,
                    class_name=job.classes[label],
                    shard=job.name,
                    source=source,
                    sha256=_png_sha(png),
                    w=int(w),
                    h=int(h),
                )
            )
            if progress:
                progress(1)
            yield key, {"png": png, "cls": label}

    write_shard(Path(out_dir) / job.name, encoded())
    return result


def finalize(out_dir: str | Path, plan_: Plan, results: list[ShardResult]) -> dict[str, Any]:
    """Write manifest.parquet and skipped.csv; return the stage metrics. Raises if nothing usable."""
    out_dir = Path(out_dir)
    rows = [r for res in results for r in res.rows]
    skipped = [s for res in results for s in res.skipped]
    skipped += [(d, "empty class folder") for d in plan_.empty_classes]
    if not rows:
        raise ValueError(
            f"prepare: no usable image at all ({len(skipped)} files skipped; see reasons below)\n  "
            + "\n  ".join(f"{s}: {r}" for s, r in skipped[:20])
        )
    rows.sort(key=lambda r: (SPLITS.index(r["split"]), r["key"]))
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = table.replace_schema_metadata({"classes": ",".join(plan_.classes)})
    # Parquet writers embed the library version; a fixed writer config keeps reruns byte-identical.
    pq.write_table(table, out_dir / MANIFEST, compression="zstd", write_statistics=False)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["source", "reason"])
    w.writerows(sorted(skipped))
    (out_dir / SKIPPED).write_text(buf.getvalue())
    metrics: dict[str, Any] = {
        "classes": len(plan_.classes),
        "skipped": len(skipped),
        "empty_class_folders": len(plan_.empty_classes),
    }
    for split in SPLITS:
        metrics[f"{split}_images"] = sum(r["split"] == split for r in rows)
        metrics[f"{split}_shards"] = sum(j.split == split for j in plan_.jobs)
    return metrics


def read_manifest(images_dir: str | Path) -> pa.Table:
    path = Path(images_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found (run the prepare stage first)")
    # ParquetFile avoids pq.read_table's dataset layer, which imports pandas (≈1 s, 56 MB) for nothing.
    return pq.ParquetFile(path).read()


def manifest_classes(table: pa.Table) -> list[str]:
    meta = table.schema.metadata or {}
    return meta.get(b"classes", b"").decode().split(",")
