"""The tokenizer's data path: image views, the image-shard dataset its DataLoaders read, and the K-Means
feature store (`data/features.zarr`) with the per-chunk extraction that fills it.

Views. A view of a stored image (square, base.image_size) is either the image itself or a random resized
crop + flip of it, resized back to the same size. The crop of (image, view) is drawn from
SeedSequence([seed, stream, split, row, view]) — row = the image's position in its split — so it does not
depend on batches, DataLoader workers, ranks or the order anything runs in.

Reading. `index_shard` lists where each PNG lies inside an image shard (tar member offsets), so a map-style
`ImageViews` dataset can hand any image to any DataLoader worker, which decodes it and makes its views.

The store (Zarr v3) holds the K-Means input only: patch features of a seeded sample of the train images,
one K-Means view each (the reference clusters ~10% of ImageNet train, random crop + flip):
  train/patches    float16 [n, T, D], chunked by `chunk_images` images (one chunk = one resumable job)
  train/rows       int64 [n]   the sampled images' rows in the train split (sorted)
  train/keys       str [n]     their `__key__`s;  train/labels int64 [n]
  train/chunk_done uint8 [n_chunks]  (1 once a chunk's features are written: what resume skips)
Root attributes: the encoder's description, the sample, the view, and a fingerprint of everything that
determines the values, so a resumed run never mixes two configs. Chunks never straddle two jobs, so jobs
(threads, processes or torchrun ranks) write disjoint files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from PIL import Image

from pipeline.config import Base
from pipeline.config import Encoder as EncoderParams
from pipeline.prepare import SPLITS, read_manifest
from pipeline.shards import ShardError, decode_png

log = logging.getLogger(__name__)

SPLIT_IDS = {split: i for i, split in enumerate(SPLITS)}
# What a crop seed is for, so equal seeds of two stages do not give equal crops.
EXTRACT_STREAM, TOKENIZE_STREAM = 1, 2


# --- views ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropSpec:
    """Random resized crop + flip (see config.Crop)."""

    scale: tuple[float, float] = (0.8, 1.0)
    ratio: tuple[float, float] = (1.0, 1.0)
    flip: bool = True

    def describe(self) -> dict[str, Any]:
        return {"scale": list(self.scale), "ratio": list(self.ratio), "flip": self.flip}


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, crop: CropSpec) -> np.ndarray:
    """A crop of `crop.scale` of the area and aspect in `crop.ratio` (log-uniform), at a uniform position,
    resized (bicubic, antialiased) back to the image's size; mirrored with probability 1/2 if `crop.flip`.

    Four draws in a fixed order whatever the settings, so e.g. turning the flip off keeps the crops.
    """
    h, w = image.shape[:2]
    area = h * w * rng.uniform(*crop.scale)
    aspect = math.exp(rng.uniform(math.log(crop.ratio[0]), math.log(crop.ratio[1])))
    cw = min(w, max(1, round(math.sqrt(area * aspect))))
    ch = min(h, max(1, round(math.sqrt(area / aspect))))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    mirror = rng.random() < 0.5 and crop.flip
    box = (left, top, left + cw, top + ch)
    out = np.asarray(Image.fromarray(image).resize((w, h), Image.BICUBIC, box=box, reducing_gap=None))
    return np.ascontiguousarray(out[:, ::-1] if mirror else out)


@dataclass(frozen=True)
class ViewPlan:
    """`count` views of every image: views [0, centre) are the stored image as is, the others random
    resized crops + flips seeded by (seed, stream, split, row, view)."""

    count: int = 1
    centre: int = 1
    crop: CropSpec = CropSpec()
    seed: int = 0
    stream: int = TOKENIZE_STREAM

    def rng(self, split: str, row: int, view: int) -> np.random.Generator:
        ids = [self.seed, self.stream, SPLIT_IDS[split], int(row), int(view)]
        return np.random.default_rng(np.random.SeedSequence(ids))

    def make(self, image: np.ndarray, split: str, row: int) -> np.ndarray:
        """uint8 [count, H, W, 3] views of one uint8 [H, W, 3] image."""
        views = [
            image if v < self.centre else random_resized_crop(image, self.rng(split, row, v), self.crop)
            for v in range(self.count)
        ]
        return np.stack(views)

    def describe(self) -> dict[str, Any]:
        return {"views": self.count, "centre_views": self.centre, "seed": self.seed, **self.crop.describe()}


# --- reading images out of shards ---------------------------------------------------------------------


@dataclass(frozen=True)
class ShardEntry:
    """One sample of an image shard: its key, label and where its PNG bytes lie in the tar."""

    key: str
    label: int
    offset: int
    size: int


def index_shard(path: str | Path) -> list[ShardEntry]:
    """The samples of an image shard in order, from its tar headers (the PNG data is skipped, not read)."""
    path = Path(path)
    pngs: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                head, _, name = m.name.rpartition("/")
                stem, _, ext = name.partition(".")  # WebDataset: the key ends at the basename's first dot
                key = f"{head}/{stem}" if head else stem
                if key not in pngs and key not in labels:
                    order.append(key)
                if ext == "png":
                    pngs[key] = (m.offset_data, m.size)
                elif ext == "cls":
                    labels[key] = int(tar.extractfile(m).read())
    except (OSError, tarfile.TarError, ValueError) as e:
        raise ShardError(f"{path}: not a readable image shard ({type(e).__name__}: {e})") from e
    missing = [k for k in order if k not in pngs or k not in labels]
    if missing:
        raise ShardError(f"{path}: sample(s) {missing[:3]} lack a png or cls member")
    return [ShardEntry(k, labels[k], *pngs[k]) for k in order]


@dataclass(frozen=True)
class ViewItem:
    path: str  # image shard
    offset: int
    size: int
    split: str
    row: int  # position in the split: seeds the views


class ImageViews(torch.utils.data.Dataset):
    """Map-style dataset: item i = uint8 [V, S, S, 3], the views of image i, decoded where it is asked for
    (in a DataLoader worker)."""

    def __init__(self, items: Sequence[ViewItem], plan: ViewPlan, image_size: int):
        self.items, self.plan, self.image_size = list(items), plan, image_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        it = self.items[i]
        with open(it.path, "rb") as f:
            f.seek(it.offset)
            data = f.read(it.size)
        image = decode_png(data)
        if image.shape != (self.image_size, self.image_size, 3):
            raise ShardError(
                f"{it.path}: image at row {it.row} of {it.split} is {list(image.shape)}, expected "
                f"[{self.image_size}, {self.image_size}, 3] (base.image_size); rerun prepare"
            )
        return torch.from_numpy(self.plan.make(image, it.split, it.row))


def resolve_workers(workers: int | str, device: torch.device) -> int:
    """DataLoader worker processes for a `workers` setting. "auto": none on CPU, where decoding in other
    processes takes the cores the encoder's threads run on (measured slower on the 2-core demo machine), and
    min(8, cores) on CUDA, where the CPU is otherwise idle and decoding would starve the device."""
    if workers != "auto":
        return int(workers)
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0


def stack_views(items: list[torch.Tensor]) -> torch.Tensor:
    """Collate [V, S, S, 3] items view-major, [V, B, S, S, 3]: each view's batch is one contiguous block,
    laid out like a plain image batch whatever V is (the encoder's kernels can depend on strides)."""
    return torch.stack(items, dim=1)


def view_loader(
    dataset: ImageViews, batch_size: int, workers: int, device: torch.device
) -> torch.utils.data.DataLoader:
    """Batches uint8 [V, B, S, S, 3] in dataset order; `workers` processes decode the PNGs."""
    if workers and multiprocessing.current_process().daemon:
        # A daemonic process (e.g. a Dask worker) may not start children: decode in this process.
        log.info("daemonic process: decoding images without DataLoader workers")
        workers = 0
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(workers, max(1, len(dataset) // batch_size)),
        collate_fn=stack_views,
        pin_memory=device.type == "cuda",
    )


# --- the shard layout of the images --------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRows:
    """One image shard = a contiguous block of rows of its split."""

    split: str
    index: int  # position of the shard within its split
    shard: str  # file name
    start: int
    count: int


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


def shard_items(images_dir: str | Path, block: ShardRows) -> tuple[list[ShardEntry], list[ViewItem]]:
    """Index one image shard and check it holds the rows the manifest says."""
    path = Path(images_dir) / block.shard
    entries = index_shard(path)
    if len(entries) != block.count:
        raise ShardError(f"{path}: manifest lists {block.count} images but the shard holds {len(entries)}")
    items = [
        ViewItem(str(path), e.offset, e.size, block.split, block.start + i) for i, e in enumerate(entries)
    ]
    return entries, items


# --- the K-Means feature store -------------------------------------------------------------------------


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def sample_count(sample: int | float, n_train: int) -> int:
    """Images a `sample` setting (fraction or count) asks for out of n_train."""
    if isinstance(sample, float):
        return max(1, min(n_train, round(sample * n_train)))
    return min(int(sample), n_train)


@dataclass(frozen=True)
class StoreSpec:
    """What a feature store holds: which images (rows, keys, labels), of what shape, chunked how."""

    rows: np.ndarray = field(repr=False)
    keys: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    tokens: int = 0
    dim: int = 0
    chunk_images: int = 1

    @property
    def chunks(self) -> int:
        return -(-len(self.rows) // self.chunk_images)


def create_or_resume(path: str | Path, spec: StoreSpec, attrs: dict[str, Any]) -> tuple[zarr.Group, int]:
    """Open `path` to continue a run with the same fingerprint, else (re)create it, rows/keys/labels filled
    in and no features yet. Returns the group and the number of chunks already complete."""
    path = Path(path)
    fp = attrs["fingerprint"]
    if path.exists():
        try:
            group = zarr.open_group(str(path), mode="r+")
            if group.attrs.get("fingerprint") == fp:
                return group, int(np.asarray(group["train/chunk_done"][:]).sum())
            log.info("%s: left by a run with other settings; starting over", path)
        except (FileNotFoundError, KeyError, ValueError) as e:
            log.info("%s: unreadable partial store (%s); starting over", path, e)
        shutil.rmtree(path)
    n, c = len(spec.rows), spec.chunk_images
    group = zarr.open_group(str(path), mode="w")
    g = group.create_group("train")
    # float16 features barely compress (zstd: ~92%), so chunks are stored raw: cheaper to write and read.
    shape = (n, spec.tokens, spec.dim)
    g.create_array("patches", shape=shape, chunks=(c, *shape[1:]), dtype="float16", compressors=None)
    g.create_array("rows", shape=(n,), chunks=(c,), dtype="int64")[:] = spec.rows
    g.create_array("labels", shape=(n,), chunks=(c,), dtype="int64")[:] = spec.labels
    g.create_array("keys", shape=(n,), chunks=(c,), dtype=str)[:] = spec.keys
    g.create_array("chunk_done", shape=(spec.chunks,), chunks=(1,), dtype="uint8", fill_value=0)
    g.attrs["num_images"] = n
    group.attrs.update(attrs)  # last: a store without its fingerprint is never resumed
    return group, 0


@dataclass(frozen=True)
class ExtractSettings:
    """Everything a chunk job needs, small and picklable (the encoder is rebuilt per process, cached)."""

    encoder: EncoderParams
    base: Base
    images: str
    plan: ViewPlan
    batch_size: int
    workers: int
    layout: tuple[ShardRows, ...]  # the train split's image shards


def chunk_items(settings: ExtractSettings, rows: np.ndarray, keys: np.ndarray) -> list[ViewItem]:
    """Where the images of `rows` (sorted train rows) lie in the image shards; checks their keys."""
    starts = np.array([b.start for b in settings.layout])
    which = np.searchsorted(starts, rows, side="right") - 1
    items: list[ViewItem] = []
    for s in np.unique(which):
        block = settings.layout[int(s)]
        entries, shard = shard_items(settings.images, block)
        for row, key in zip(rows[which == s], keys[which == s], strict=True):
            entry = entries[int(row) - block.start]
            if entry.key != str(key):
                raise ShardError(
                    f"{shard[0].path}: row {row} holds key {entry.key!r} but the feature store expects "
                    f"{key!r}; rerun extract from scratch (delete the .partial store)"
                )
            items.append(shard[int(row) - block.start])
    return items


def extract_chunk(
    settings: ExtractSettings,
    chunk: int,
    store_path: str | Path,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Encode the K-Means views of one chunk of sampled images into the store; False if already done.

    A module-level job (the map_jobs contract of pipeline/stage.py): it opens the store by path and gets
    the encoder from the per-process cache.
    """
    from pipeline.tokenizer import encoder_from_params

    g = zarr.open_group(str(store_path), mode="r+")["train"]
    if g["chunk_done"][chunk]:
        return False
    size = g["patches"].chunks[0]
    lo, hi = chunk * size, min(chunk * size + size, g["patches"].shape[0])
    rows, keys = np.asarray(g["rows"][lo:hi]), np.asarray(g["keys"][lo:hi])
    encoder = encoder_from_params(settings.encoder, settings.base)
    dataset = ImageViews(chunk_items(settings, rows, keys), settings.plan, settings.base.image_size)
    feats = np.empty((hi - lo, *g["patches"].shape[1:]), dtype=np.float16)
    i = 0
    for views in view_loader(dataset, settings.batch_size, settings.workers, encoder.device):
        x = views[0].to(encoder.device, non_blocking=True)
        feats[i : i + len(x)] = encoder.patch_features(x).to(torch.float16).cpu().numpy()
        i += len(x)
        if progress:
            progress(len(x))
    g["patches"][lo:hi] = feats
    g["chunk_done"][chunk] = 1  # last: a kill before this line redoes the chunk
    return True


def open_features(path: str | Path) -> zarr.Group:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: feature store not found (run the extract stage first)")
    group = zarr.open_group(str(path), mode="r")
    if "train" not in group or "patches" not in group["train"]:
        raise KeyError(f"{path}: not a feature store (no train/patches array); rerun the extract stage")
    return group
