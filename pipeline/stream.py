"""Training batches streamed from shards, as a pure function of (seed, step, rank, world).

Epoch e visits the shards in a permutation drawn from (seed, e) and each shard's samples in a
permutation drawn from (seed, e, shard). The global batch of step s is samples [s·B, (s+1)·B) of that
sequence, and rank r of W takes rows [r·B/W, (r+1)·B/W) of it. So resuming at step s needs no replay,
W processes see exactly the single-process global batch, and decoded shards are kept in a cache of bounded
size (`cache_bytes`, at least one shard), so memory does not grow with the dataset while a small dataset
(the demo's four image shards) is decoded once rather than once per epoch.

Token shards with V augmented views per image (tokenize.views) give each sample one view per epoch,
drawn from (seed, e, shard, row): every field of the sample (DiGIT and VQ tokens) comes from that view.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.io import read_json
from pipeline.shards import count_samples, iter_samples

TOKEN_META = "meta.json"  # in the token shards' directory: vocabularies, grids, views, class names
_VIEW_DRAW = 0x76696577  # tells the view draws' seeds apart from the permutations'


@functools.lru_cache(maxsize=64)
def _perm(n: int, *seed: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence(list(seed))).permutation(n)


@functools.lru_cache(maxsize=64)
def _view_draws(n: int, views: int, *seed: int) -> np.ndarray:
    return np.random.default_rng(np.random.SeedSequence([*seed, _VIEW_DRAW])).integers(0, views, n)


def _as_row(field: str, value) -> np.ndarray:
    if field == "png":
        return np.asarray(value, dtype=np.uint8)
    return np.asarray(value).astype(np.int64).reshape(-1 if field.endswith("npy") else ())


class ShardStream:
    """`fields` maps batch names to sample fields, e.g. {"tokens": "digit.npy", "label": "cls"}.

    Integer token grids come out flattened as int64 [B, h·w], labels as int64 [B], images as uint8
    [B, H, W, 3]. `views` maps a sample field (view 0) to the field holding its other V-1 views
    ([V-1, h, w], e.g. {"digit.npy": "digit_views.npy"}); with `num_views` V > 1 each sample then gives
    one view per epoch, the same for all its fields, and fields without other views are shared by all views.
    """

    def __init__(
        self,
        shards: Sequence[str | Path],
        fields: dict[str, str],
        global_batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        views: dict[str, str] | None = None,
        num_views: int = 1,
        cache_bytes: int = 256 << 20,
    ):
        if global_batch % world:
            raise ValueError(
                f"global batch {global_batch} is not divisible by the number of processes {world}"
            )
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        self.shards = [Path(s) for s in shards]
        self.fields = fields
        self.views = dict(views or {}) if num_views > 1 else {}
        self.num_views = num_views
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.counts = [count_samples(s) for s in self.shards]
        if self.shards:
            self._load(0)  # fields and views are checked now, not at the first batch
        self.epoch_size = sum(self.counts)
        if self.epoch_size == 0:
            raise ValueError(f"no samples in {len(self.shards)} token shard(s)")

    def _row(self, shard: int, sample: dict, field: str) -> np.ndarray:
        if field not in sample:
            raise KeyError(f"{self.shards[shard]}: sample {sample['__key__']} has no field {field!r}")
        row = _as_row(field, sample[field])
        extra = self.views.get(field)
        if extra is None:
            return row
        if extra not in sample:
            raise KeyError(f"{self.shards[shard]}: sample {sample['__key__']} has no field {extra!r}")
        others = np.asarray(sample[extra]).astype(np.int64).reshape(len(sample[extra]), -1)
        if others.shape != (self.num_views - 1, row.size):
            raise ValueError(
                f"{self.shards[shard]}: sample {sample['__key__']}: {extra} has shape "
                f"{list(np.shape(sample[extra]))}, expected {self.num_views - 1} views of {field}'s "
                f"{list(np.shape(sample[field]))} (meta.json views: {self.num_views})"
            )
        return np.concatenate([row[None], others])  # [V, h·w]: view 0 first

    def _load(self, index: int) -> dict[str, np.ndarray]:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        cols: dict[str, list] = {name: [] for name in self.fields}
        for s in iter_samples([self.shards[index]]):
            for name, field in self.fields.items():
                cols[name].append(self._row(index, s, field))
        data = {k: (np.stack(v) if v else np.zeros((0,), np.int64)) for k, v in cols.items()}
        self._cache[index] = data
        size = sum(a.nbytes for d in self._cache.values() for a in d.values())
        while len(self._cache) > 1 and size > self.cache_bytes:  # least recently used first
            _, old = self._cache.popitem(last=False)
            size -= sum(a.nbytes for a in old.values())
        return data

    def _view(self, epoch: int, shard: int, row: int) -> int:
        if self.num_views == 1:
            return 0
        return int(_view_draws(self.counts[shard], self.num_views, self.seed, epoch, shard)[row])

    def view_of(self, position: int) -> int:
        """The view the sample at a global stream position gives (0 when there is one view)."""
        return self._view(position // self.epoch_size, *self._locate(position))

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
            view = self._view(position // self.epoch_size, shard, row)
            for name, field in self.fields.items():
                rows[name].append(data[name][row, view] if field in self.views else data[name][row])
        return {name: torch.from_numpy(np.stack(values)) for name, values in rows.items()}

    def batches(self, start_step: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1


def token_views(meta: dict) -> tuple[int, dict[str, str]]:
    """(V, {view-0 field: field of the other V-1 views}) of a token directory's meta.json."""
    num_views = int(meta.get("views", 1))
    views = {
        spec["field"]: spec["views_field"]
        for spec in (meta.get("digit"), meta.get("vq"))
        if isinstance(spec, dict) and spec.get("views_field")
    }
    if num_views > 1 and not views:
        raise ValueError(f"{TOKEN_META}: views is {num_views} but no token field names its views_field")
    return num_views, views


def read_token_meta(tokens_dir: str | Path) -> dict:
    """{"digit": {"field", "vocab", "grid"[, "views_field"]}, "vq": {...}, "views", "num_classes", "classes"}
    of a token directory."""
    path = Path(tokens_dir) / TOKEN_META
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the tokenize stage first)")
    return read_json(path)
