"""Training batches streamed from shards, as a pure function of (seed, step, rank, world).

Epoch e visits the shards in a permutation drawn from (seed, e) and each shard's samples in a
permutation drawn from (seed, e, shard). The global batch of step s is samples [s·B, (s+1)·B) of that
sequence, and rank r of W takes rows [r·B/W, (r+1)·B/W) of it. So resuming at step s needs no replay,
W processes see exactly the single-process global batch, and only one shard is decoded at a time
(memory does not grow with the dataset).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.io import read_json
from pipeline.shards import count_samples, iter_samples

TOKEN_META = "meta.json"  # in the token shards' directory: vocabularies, grids, class names


@functools.lru_cache(maxsize=64)
def _perm(n: int, *seed: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence(list(seed))).permutation(n)


def _as_row(field: str, value) -> np.ndarray:
    if field == "png":
        return np.asarray(value, dtype=np.uint8)
    return np.asarray(value).astype(np.int64).reshape(-1 if field.endswith("npy") else ())


class ShardStream:
    """`fields` maps batch names to sample fields, e.g. {"tokens": "digit.npy", "label": "cls"}.

    Integer token grids come out flattened as int64 [B, h·w], labels as int64 [B], images as uint8
    [B, H, W, 3].
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        fields: dict[str, str],
        global_batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ):
        if global_batch % world:
            raise ValueError(
                f"global batch {global_batch} is not divisible by the number of processes {world}"
            )
        self.shards = [Path(s) for s in shards]
        self.fields = fields
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None
        # counted from the tar headers, not decoded: at ImageNet size decoding every shard here costs an hour
        self.counts = [count_samples(s) for s in self.shards]
        self.epoch_size = sum(self.counts)
        if self.epoch_size == 0:
            raise ValueError(f"no samples in {len(self.shards)} token shard(s)")

    def _load(self, index: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != index:
            cols: dict[str, list] = {name: [] for name in self.fields}
            for s in iter_samples([self.shards[index]]):
                for name, field in self.fields.items():
                    if field not in s:
                        raise KeyError(f"{self.shards[index]}: sample {s['__key__']} has no field {field!r}")
                    cols[name].append(_as_row(field, s[field]))
            data = {k: (np.stack(v) if v else np.zeros((0,), np.int64)) for k, v in cols.items()}
            self._cache = (index, data)
        return self._cache[1]

    def _locate(self, position: int) -> tuple[int, int]:
        """(shard index, row within that shard) of the sample at a global stream position."""
        epoch, offset = divmod(position, self.epoch_size)
        for shard in _perm(len(self.shards), self.seed, epoch):
            if offset < self.counts[shard]:
                return int(shard), int(_perm(self.counts[shard], self.seed, epoch, int(shard))[offset])
            offset -= self.counts[shard]
        raise AssertionError("unreachable")

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        per_rank = self.global_batch // self.world
        first = step * self.global_batch + self.rank * per_rank
        rows: dict[str, list[np.ndarray]] = {name: [] for name in self.fields}
        for position in range(first, first + per_rank):
            shard, row = self._locate(position)
            data = self._load(shard)
            for name in self.fields:
                rows[name].append(data[name][row])
        return {name: torch.from_numpy(np.stack(values)) for name, values in rows.items()}

    def batches(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


def read_token_meta(tokens_dir: str | Path) -> dict:
    """{"digit": {"field", "vocab", "grid"}, "vq": {...}, "num_classes", "classes"} of a token directory."""
    path = Path(tokens_dir) / TOKEN_META
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the tokenize stage first)")
    return read_json(path)
