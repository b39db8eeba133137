"""The pieces of the evaluation stages (fidelity, class_match, probe, stability, upper_bound) that are not
stage glue.

* seeded subsets of shards (`iter_subset`, `read_subset`): every cap (probe, stability, upper bounds,
  reference) takes a seeded random subset, never the first N — ImageFolder shards are written in class order;
* linear-probe features of a frozen GPT (`gpt_probe_features`, streamed to disk by `write_probe_features`):
  each block's output mean-pooled over [BOS, t1..tN], fed BOS / the null class (labels=None) so the label
  never leaks into the features;
* upper-bound images: true DiGIT tokens -> renderer -> VQ decoder, and plain VQ reconstructions.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline.metrics.probe import FeatureFile
from pipeline.models.gpt import GPT, rowwise
from pipeline.models.nar_renderer import NARRenderer
from pipeline.models.renderer import Renderer
from pipeline.pixel_vq import to_model_range, to_uint8
from pipeline.sampling import sample_generators
from pipeline.shards import ShardImages, count_samples, decode_sample, iter_samples, list_shards

# --- seeded subsets of shards ------------------------------------------------------------------------


def subset_indices(total: int, n: int | None, seed: int) -> np.ndarray:
    """Sorted positions of a seeded random subset of `n` of `total` items (all of them if n is None or
    n >= total). A function of (total, n, seed) only."""
    if total <= 0:
        raise ValueError("subset_indices: there are no items to choose from")
    if n is None or n >= total:
        return np.arange(total)
    if n < 1:
        raise ValueError(f"subset_indices: n must be >= 1, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, total, n]))
    return np.sort(rng.choice(total, size=n, replace=False))


def iter_subset(shards: Sequence[str | Path], n: int | None, seed: int) -> Iterator[dict[str, Any]]:
    """The samples at `subset_indices(total, n, seed)` of the shards' concatenation, streamed in shard order,
    each with its position in that concatenation as "__index__". Only the chosen samples are decoded."""
    if not shards:
        raise FileNotFoundError("read_subset: no shards given (is the directory empty?)")
    total = sum(count_samples(s) for s in shards)
    keep = subset_indices(total, n, seed)
    j = 0
    for i, raw in enumerate(iter_samples(shards, decode=False)):
        if j < len(keep) and i == keep[j]:
            yield {**decode_sample(raw), "__index__": i}
            j += 1


def read_subset(shards: Sequence[str | Path], n: int | None, seed: int) -> list[dict[str, Any]]:
    """`iter_subset` as a list (memory grows with n, not with the dataset)."""
    return list(iter_subset(shards, n, seed))


def require(path: str | Path, what: str, stage: str) -> Path:
    """`path`, or a FileNotFoundError naming the stage that makes it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found (run `python -m stages.{stage}` first)")
    return path


def image_subset(images_dir: str | Path, split: str, n: int | None, seed: int) -> ShardImages:
    """A seeded subset of n images of a split (all of them if n is None) as a Dataset streamed from the
    shards (uint8 [3, H, W] items; `.labels`, `.keys`)."""
    shards = list_shards(images_dir, split)
    return ShardImages(shards, subset_indices(sum(count_samples(s) for s in shards), n, seed))


def stack_field(samples: Sequence[dict[str, Any]], field: str, where: str = "samples") -> np.ndarray:
    """np.stack of one field of every sample (e.g. "png" -> uint8 [N, H, W, 3], "cls" -> [N])."""
    missing = [s["__key__"] for s in samples if field not in s]
    if missing:
        raise KeyError(f"{where}: {len(missing)} sample(s) have no field {field!r}, e.g. {missing[0]}")
    return np.stack([np.asarray(s[field]) for s in samples])


def load_images(
    images_dir: str | Path, split: str, n: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W, 3] and labels [N] of a seeded subset of a split (all of it if n is None)."""
    shards = list_shards(images_dir, split)
    if not shards:
        raise FileNotFoundError(f"{images_dir}: no {split}-*.tar shards (run the prepare stage first)")
    samples = read_subset(shards, n, seed)
    where = f"{images_dir}/{split}"
    return stack_field(samples, "png", where), stack_field(samples, "cls", where).astype(np.int64)


# --- linear-probe features -----------------------------------------------------------------------------


@torch.no_grad()
def write_probe_features(
    gpt: GPT, batches: Iterable[torch.Tensor], out_dir: str | Path, prefix: str, progress: bool = True
) -> list[FeatureFile]:
    """Stream token batches (int64 [b, block_size]) through the frozen GPT and append each block's
    mean-pooled features to `<out_dir>/<prefix>-layerNN.f32` (one FeatureFile per block): memory holds one
    batch, whatever the number of sequences."""
    was_training = gpt.training
    gpt.eval()
    device = gpt.wte.weight.device
    files = [
        FeatureFile(Path(out_dir) / f"{prefix}-layer{i + 1:02d}.f32", gpt.config.n_embd)
        for i in range(gpt.config.n_layer)
    ]
    for tokens in tqdm(batches, desc=f"probe features ({prefix})", unit="batch", disable=not progress):
        for f, h in zip(files, gpt.forward_features(tokens.to(device), labels=None), strict=True):
            f.append(h.float().mean(dim=1))
    gpt.train(was_training)
    return files


# --- upper-bound images --------------------------------------------------------------------------------


def _decode(vq: nn.Module, ids: torch.Tensor, batch_invariant: bool) -> np.ndarray:
    if batch_invariant:
        # conv kernels pick code paths by batch size; one row at a time keeps the pixels batch-free
        return to_uint8(rowwise(lambda rows: vq.decode(ids[rows]), ids.shape[0]))
    return to_uint8(vq.decode(ids))


@torch.no_grad()
def render_true_tokens(
    renderer: Renderer | NARRenderer,
    vq: nn.Module,
    digit_tokens: torch.Tensor,
    vq_grid: tuple[int, int],
    indices: Sequence[int],
    seed: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_invariant: bool = False,
    batch_size: int = 50,
    progress: bool = True,
    **nar_options: Any,
) -> np.ndarray:
    """Upper bound (a): true DiGIT tokens [N, T] -> renderer -> VQ decoder -> uint8 [N, H, W, 3].

    Image j is drawn with the generator of sample_generators(seed, [indices[j]]), so it depends on its own
    index (its position in the val set), never on the batch or on which other images were chosen.
    nar_options (steps, choice_temperature) go to a NAR renderer's generate."""
    if len(indices) != len(digit_tokens):
        raise ValueError(f"{len(digit_tokens)} token rows but {len(indices)} indices")
    device = renderer.digit_emb.weight.device
    out = []
    for start in tqdm(
        range(0, len(digit_tokens), batch_size), desc="render true tokens", unit="batch", disable=not progress
    ):
        rows = digit_tokens[start : start + batch_size].to(device)
        gens = sample_generators(seed, list(indices[start : start + batch_size]))
        ids = renderer.generate(
            rows,
            gens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            batch_invariant=batch_invariant,
            **nar_options,
        )
        out.append(_decode(vq, ids.view(-1, *vq_grid), batch_invariant))
    return np.concatenate(out)


@torch.no_grad()
def vq_reconstructions(
    vq: nn.Module,
    images: np.ndarray,
    batch_size: int = 50,
    batch_invariant: bool = False,
    progress: bool = True,
) -> np.ndarray:
    """Upper bound (b): uint8 images [N, H, W, 3] -> VQ encode -> decode -> uint8 [N, H, W, 3]."""
    device = next(vq.parameters()).device
    out = []
    for start in tqdm(
        range(0, len(images), batch_size), desc="VQ reconstruct", unit="batch", disable=not progress
    ):
        x = to_model_range(images[start : start + batch_size]).to(device)
        ids = rowwise(lambda rows, x=x: vq.encode(x[rows]), len(x)) if batch_invariant else vq.encode(x)
        out.append(_decode(vq, ids, batch_invariant))
    return np.concatenate(out)
