"""Image streams for SSL pretraining: `batches(start_step)` callables for the shared loop (pipeline/train.py).

Each yields {"image": uint8 [B/W, 3, H, W]} — this rank's rows of global batch B at every step — as a pure
function of (seed, step, rank, world), so a resumed run sees exactly the batches it would have seen.
  shard_batches      the train image shards, streamed one shard at a time (pipeline/stream.py): memory does
                     not grow with the dataset; the source for any data (ImageFolder included)
  generator_batches  the built-in generator's train split, read on and on past the prepared train set:
                     step s takes train images s*B .. s*B+B-1, so every image is new and there is no epoch
                     (val images come from another split of the generator and are never drawn)
  image_batches      an in-memory uint8 array, epoch after epoch (tests and benchmarks)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline.ranks import rank_world
from pipeline.stream import ShardStream
from pipeline.synthetic import generate_images

Batches = Callable[[int], Iterator[dict[str, torch.Tensor]]]


def _per_rank(batch_size: int) -> tuple[int, int, int]:
    rank, world = rank_world()
    if batch_size % world != 0:
        raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world}")
    return rank, world, batch_size // world


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def image_batches(images: np.ndarray, batch_size: int, seed: int) -> Batches:
    """images: uint8 [N, H, W, 3]. The sample stream is epoch after epoch of a permutation drawn from
    (seed, epoch)."""
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    n = len(images)
    if n == 0:
        raise ValueError("images: empty; SSL pretraining needs at least one image")

    def batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        rank, _, per_rank = _per_rank(batch_size)
        perms: dict[int, np.ndarray] = {}

        def perm(epoch: int) -> np.ndarray:
            if epoch not in perms:
                if len(perms) > 2:
                    perms.clear()
                perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
            return perms[epoch]

        step = start
        while True:
            pos = np.arange(step * batch_size + rank * per_rank, step * batch_size + (rank + 1) * per_rank)
            epochs, offsets = pos // n, pos % n
            # pos is increasing, so concatenating epoch by epoch keeps the stream order
            idx = np.concatenate([perm(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])
            yield {"image": _nchw(images[idx])}
            step += 1

    return batches


def shard_batches(shards: Sequence[str | Path], batch_size: int, seed: int) -> Batches:
    """The image shards' `png` fields, in ShardStream's seeded order (one decoded shard in memory)."""
    if not shards:
        raise FileNotFoundError("shard_batches: no image shards given")

    def batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        rank, world, _ = _per_rank(batch_size)
        stream = ShardStream(shards, {"image": "png"}, batch_size, seed, rank, world)
        for b in stream.batches(start):
            yield {"image": b["image"].permute(0, 3, 1, 2).contiguous()}

    return batches


def generator_batches(
    image_size: int, data_seed: int, num_classes: int, batch_size: int, prefetch: bool = True
) -> Batches:
    """Fresh built-in train images every step: step s, rank r takes train-split images
    s*B + r*B/W .. s*B + (r+1)*B/W - 1 of `pipeline.synthetic.generate_images(seed=data_seed)` — the first
    steps are the prepared train set itself, and from then on images nobody has seen.

    prefetch: render the next step's images in a background thread while the model trains on this one
    (PIL and numpy release the GIL for part of the work); the images are the same either way."""

    def render(step: int, rank: int, per_rank: int) -> torch.Tensor:
        start = step * batch_size + rank * per_rank
        images, _ = generate_images(per_rank, image_size, data_seed, num_classes, "train", start=start)
        return _nchw(images)

    def batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        rank, _, per_rank = _per_rank(batch_size)
        if not prefetch:
            step = start
            while True:
                yield {"image": render(step, rank, per_rank)}
                step += 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(render, start, rank, per_rank)
            step = start
            while True:
                images = pending.result()
                pending = pool.submit(render, step + 1, rank, per_rank)
                yield {"image": images}
                step += 1

    return batches
