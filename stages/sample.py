"""Stage `sample`: generate images and write them as WebDataset shards, plus a labelled grid.

variant `digit`: stage-1 GPT → DiGIT tokens → renderer (AR or NAR) → VQ tokens → VQ decoder → pixels.
variant `vq`:    GPT trained on VQ tokens → VQ tokens → VQ decoder → pixels (the renderer is not used).
Stage 1 samples with sample.gpt, or for variant vq with sample.gpt_vq when that is set (the paper samples its
DiGIT GPTs with top-k and its VQ-AR baseline without a filter).

Sample i is drawn with generators from (sample.seed, i) — the same generator goes to the GPT and then the
renderer — and gets label i % num_classes when the GPT is class-conditional (balanced classes; -1 when it
is unconditional). Batches of sample.batch_size rows run on base.device, CFG rows in the same batch; batches
start at every shard's first sample, so a batch never spans two shards and the samples are a function of the
params alone (batch size included). With sample.batch_invariant every row is computed on its own instead, so
the shards are byte-identical for any batch size (several times slower).

Shards `<out>/samples-NNNNN.tar` hold sample.shard_size samples keyed `sample_%07d` with `png`, `cls`,
`vq.npy` (uint16 [h', w']) and, for variant digit, `digit.npy` (uint16 [h, w]); `<out>/meta.json` records
the settings. Under `torchrun --nproc_per_node N` every rank writes a contiguous block of shards and rank 0
writes meta.json and the grid: the output is byte-identical to one process. A killed run keeps its finished
shards in `<out>.tmp/` and resumes from them if the settings and model weights are the same.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from pipeline.checkpoint import checkpoint_sha256
from pipeline.config import GPTSampler, Params, RendererSampler, Sample, Sampler, with_overrides
from pipeline.evaluation import require
from pipeline.io import promote, read_json, write_json
from pipeline.models.gpt import GPT, load_gpt, rowwise
from pipeline.models.nar_renderer import NARRenderer
from pipeline.models.renderer import Renderer, load_renderer
from pipeline.pixel_vq import load_pixel_vq, to_uint8
from pipeline.ranks import barrier, gather, my_block, process_group
from pipeline.sampling import sample_generators
from pipeline.shards import ShardImages, iter_samples, list_shards, shard_name, write_shard
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import read_token_meta
from pipeline.train import resolve_device
from pipeline.viz import image_grid, save_png
from stages.train_gpt import check_variant, fill_variant, token_spec

log = logging.getLogger("digit.sample")
PATHS = {
    "variant": "digit",
    "gpt": "models/gpt_{variant}",
    "renderer": "models/renderer",
    "vq": "models/vq",
    "tokens": "data/tokens",
    "out": "data/samples/{variant}",
    "grid": "reports/samples_{variant}.png",
    "metrics": "metrics/sample_{variant}.json",
}
GRID_PER_CLASS = 8  # images per row of the grid
GRID_ROWS_UNCONDITIONAL = 8
RUN_META = "meta.json"
NO_CLASS = -1  # `cls` of samples from an unconditional GPT


def knob_metrics(prefix: str, s: Sampler) -> dict[str, float]:
    """Flat sampling knobs. A filter that is off (None) is reported as the value that turns it off in
    pipeline.sampling — top_k 0, top_p 1.0 — so every key is always present and numeric."""
    out = {
        f"{prefix}_temperature": s.temperature,
        f"{prefix}_top_k": s.top_k if s.top_k is not None else 0,
        f"{prefix}_top_p": s.top_p if s.top_p is not None else 1.0,
    }
    if hasattr(s, "cfg_scale"):
        out[f"{prefix}_cfg_scale"] = s.cfg_scale
    if hasattr(s, "nar_steps"):
        out[f"{prefix}_nar_steps"] = s.nar_steps
        out[f"{prefix}_nar_choice_temperature"] = s.nar_choice_temperature
    return out


@dataclass
class Models:
    variant: str
    gpt: GPT
    renderer: Renderer | NARRenderer | None
    vq: nn.Module
    digit_grid: tuple[int, int]
    vq_grid: tuple[int, int]
    num_classes: int  # 0: unconditional GPT


def load_models(
    variant: str, gpt: str, renderer: str, vq: str, meta: dict[str, Any], device: torch.device
) -> Models:
    """Load the variant's models and check that they fit the token vocabularies and grids of `meta`."""
    _, vocab, grid = token_spec(meta, variant)
    needed = {gpt: f"train_gpt --variant {variant}", vq: "train_vq"}
    if variant == "digit":
        needed[renderer] = "train_renderer"
    for directory, stage in needed.items():
        if not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(
                f"{directory}: no checkpoint there (run `python -m stages.{stage}` first)"
            )
    trained_on = read_json(Path(gpt) / "config.json").get("variant")
    if trained_on is not None and trained_on != variant:
        raise ValueError(f"{gpt}: a GPT trained on {trained_on!r} tokens, but the variant is {variant!r}")
    gpt_model = load_gpt(gpt, map_location=str(device)).eval()
    c = gpt_model.config
    if (c.vocab_size, c.block_size) != (vocab, grid[0] * grid[1]):
        raise ValueError(
            f"{gpt}: GPT has vocab {c.vocab_size} and {c.block_size} tokens, but the {variant!r} tokens have "
            f"vocab {vocab} and grid {list(grid)}; retrain it on these tokens"
        )
    if c.num_classes not in (0, meta["num_classes"]):
        raise ValueError(f"{gpt}: GPT has {c.num_classes} classes, the token shards {meta['num_classes']}")
    _, k, digit_grid = token_spec(meta, "digit")
    _, v, vq_grid = token_spec(meta, "vq")
    renderer_model = None
    if variant == "digit":
        renderer_model = load_renderer(renderer, map_location=str(device)).eval()
        r = renderer_model.config
        want = (k, v, digit_grid[0] * digit_grid[1], vq_grid[0] * vq_grid[1])
        if (r.digit_vocab_size, r.vq_vocab_size, r.digit_len, r.vq_len) != want:
            raise ValueError(
                f"{renderer}: renderer maps {r.digit_len} tokens (K={r.digit_vocab_size}) to {r.vq_len} "
                f"(V={r.vq_vocab_size}); the token shards need {want[2]} (K={k}) to {want[3]} (V={v})"
            )
    vq_model = load_pixel_vq(vq, device)
    if vq_model.codebook_size != v:
        raise ValueError(f"{vq}: VQ codebook has {vq_model.codebook_size} entries, the VQ tokens use {v}")
    return Models(variant, gpt_model, renderer_model, vq_model, digit_grid, vq_grid, c.num_classes)


def labels_of(indices: range, num_classes: int) -> list[int]:
    return [i % num_classes if num_classes else NO_CLASS for i in indices]


@torch.no_grad()
def generate_batch(models: Models, s: Sample, indices: range) -> dict[str, np.ndarray]:
    """Samples `indices`: {"png": uint8 [B, H, W, 3], "cls": [B], "vq": uint16 [B, h', w'], "digit"?}."""
    gens = sample_generators(s.seed, indices)
    labels = labels_of(indices, models.num_classes)
    device = models.gpt.wte.weight.device
    label_t = torch.tensor(labels, device=device) if models.num_classes else None
    g = s.gpt_for(models.variant)
    tokens = models.gpt.generate(
        gens,
        labels=label_t,
        temperature=g.temperature,
        top_k=g.top_k,
        top_p=g.top_p,
        cfg_scale=g.cfg_scale,
        batch_invariant=s.batch_invariant,
    )
    out: dict[str, np.ndarray] = {"cls": np.asarray(labels)}
    if models.renderer is not None:
        r = s.renderer
        out["digit"] = tokens.view(-1, *models.digit_grid).cpu().numpy().astype(np.uint16)
        # the same generators, continuing their streams: sample i stays a function of (seed, i)
        tokens = models.renderer.generate(
            tokens,
            gens,
            **r.generate_kwargs(nar=isinstance(models.renderer, NARRenderer)),
            batch_invariant=s.batch_invariant,
        )
    ids = tokens.view(-1, *models.vq_grid)
    out["vq"] = ids.cpu().numpy().astype(np.uint16)
    if s.batch_invariant:
        # conv kernels also pick code paths by batch size; one row at a time keeps the pixels batch-free
        images = rowwise(lambda rows: models.vq.decode(ids[rows]), ids.shape[0])
    else:
        images = models.vq.decode(ids)
    out["png"] = to_uint8(images)
    return out


def shard_samples(batch: dict[str, np.ndarray], indices: range) -> Iterator[tuple[str, dict[str, Any]]]:
    for row, i in enumerate(indices):
        fields: dict[str, Any] = {"png": batch["png"][row], "cls": int(batch["cls"][row])}
        if "digit" in batch:
            fields["digit.npy"] = batch["digit"][row]
        fields["vq.npy"] = batch["vq"][row]
        yield f"sample_{i:07d}", fields


def model_hashes(variant: str, gpt: str, renderer: str, vq: str) -> dict[str, str]:
    """Checkpoint hashes of the models a variant uses (missing checkpoints are left to load_models' check)."""
    dirs = {"gpt": gpt, "vq": vq, **({"renderer": renderer} if variant == "digit" else {})}
    return {
        f"{name}_sha256": checkpoint_sha256(d)
        for name, d in dirs.items()
        if (Path(d) / "model.safetensors").is_file()
    }


def run_settings(
    params: Params, variant: str, hashes: dict[str, str], meta: dict[str, Any], device: torch.device
) -> dict[str, Any]:
    """What the samples depend on; a partial run is only resumed when all of it is unchanged."""
    s = params.sample
    settings: dict[str, Any] = {
        "variant": variant,
        "n": s.n,
        "seed": s.seed,
        "batch_invariant": s.batch_invariant,
        # batched, the samples depend on the batch composition
        "batch_size": None if s.batch_invariant else s.batch_size,
        "shard_size": s.shard_size,
        "gpt": s.gpt_for(variant).model_dump(mode="json"),
        **hashes,
        "device": device.type,
        "classes": meta["classes"],
    }
    if variant == "digit":
        settings["renderer"] = s.renderer.model_dump(mode="json")
    return settings


def grid_picture(shards_dir: Path, classes: list[str], conditional: bool, title: str) -> Image.Image:
    """Rows of GRID_PER_CLASS samples: one row per class (conditional) or the first rows (unconditional)."""
    per_row = GRID_PER_CLASS
    n_rows = len(classes) if conditional else GRID_ROWS_UNCONDITIONAL
    rows: list[list[np.ndarray]] = [[] for _ in range(n_rows)]
    taken = 0
    for i, smp in enumerate(iter_samples(list_shards(shards_dir, "samples"))):
        r = smp["cls"] if conditional else i // per_row
        if r < n_rows and len(rows[r]) < per_row:
            rows[r].append(smp["png"])
            taken += 1
        if taken == n_rows * per_row:
            break
    keep = [r for r in range(n_rows) if rows[r]]
    labels = [classes[r] for r in keep] if conditional else None
    return image_grid([rows[r] for r in keep], labels, title=title)


@functools.lru_cache(maxsize=2)
def _cached_models(
    variant: str, gpt: str, renderer: str, vq: str, meta_json: str, device: str, shas: tuple[str, ...]
) -> Models:
    """The models of a run, loaded once per process (shard tasks may run in worker processes); `shas`
    (checkpoint hashes) is part of the key so retrained weights at the same path are reloaded."""
    return load_models(variant, gpt, renderer, vq, json.loads(meta_json), torch.device(device))


@dataclass(frozen=True)
class SampleShard:
    """One shard of samples: what a worker needs to write it (picklable; the models are loaded there)."""

    index: int
    first: int  # sample indices [first, last)
    last: int
    sample: Sample
    variant: str
    gpt: str
    renderer: str
    vq: str
    meta_json: str
    device: str
    shas: tuple[str, ...]


def write_sample_shard(
    job: SampleShard, out_dir: str | Path, progress: Callable[[int], None] | None = None
) -> int:
    """Write shard `job.index` into out_dir (skipped if a finished one is there); returns images generated."""
    path = Path(out_dir) / shard_name("samples", job.index)
    if path.is_file():
        if progress:
            progress(job.last - job.first)
        return 0
    models = _cached_models(job.variant, job.gpt, job.renderer, job.vq, job.meta_json, job.device, job.shas)
    s = job.sample

    def samples() -> Iterator[tuple[str, dict[str, Any]]]:
        for start in range(job.first, job.last, s.batch_size):
            indices = range(start, min(start + s.batch_size, job.last))
            yield from shard_samples(generate_batch(models, s, indices), indices)
            if progress:
                progress(len(indices))

    write_shard(path, samples())
    return job.last - job.first


def _prepare_partial(tmp: Path, settings: dict[str, Any]) -> None:
    """Keep finished shards of a run with the same settings; anything else in `tmp` is stale."""
    saved = tmp / RUN_META
    if any(tmp.iterdir()) and (not saved.is_file() or read_json(saved) != settings):
        log.info("sample: %s was left by a run with other settings or weights; starting over", tmp)
        shutil.rmtree(tmp)
        tmp.mkdir()
    write_json(saved, settings)


def run(
    params: Params,
    variant: str = PATHS["variant"],
    gpt: str = PATHS["gpt"],
    renderer: str = PATHS["renderer"],
    vq: str = PATHS["vq"],
    tokens: str = PATHS["tokens"],
    out: str = PATHS["out"],
    grid: str | None = PATHS["grid"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    check_variant(variant)
    gpt, out, grid = fill_variant(gpt, variant), fill_variant(out, variant), fill_variant(grid, variant)
    s = params.sample
    meta = read_token_meta(tokens)
    meta_json = json.dumps(meta, sort_keys=True)
    device = resolve_device(params.base.device)
    hashes = model_hashes(variant, gpt, renderer, vq)
    shas = tuple(sorted(hashes.values()))
    models = _cached_models(variant, gpt, renderer, vq, meta_json, str(device), shas)
    key = s.gpt_key(variant)
    if not models.num_classes and s.gpt_for(variant).cfg_scale != 1.0:
        # guidance mixes conditional and unconditional logits; with no classes there is nothing to mix
        log.warning(
            "sample[%s]: %s is unconditional, so sample.%s.cfg_scale %g does not apply; sampling with 1",
            variant,
            gpt,
            key,
            s.gpt_for(variant).cfg_scale,
        )
        params = with_overrides(params, {f"sample.{key}.cfg_scale": 1.0})
        s = params.sample
    settings = run_settings(params, variant, hashes, meta, device)
    n_shards = -(-s.n // s.shard_size)
    jobs = [
        SampleShard(
            i,
            i * s.shard_size,
            min((i + 1) * s.shard_size, s.n),
            s,
            variant,
            gpt,
            renderer,
            vq,
            meta_json,
            str(device),
            shas,
        )
        for i in range(n_shards)
    ]
    with process_group(device) as (rank, world):
        mine = my_block(jobs, rank, world)
        log.info(
            "sample[%s]: %d images in %d shard(s) (this process: %d), %s, batch %d%s on %s",
            variant,
            s.n,
            n_shards,
            len(mine),
            f"{models.num_classes} classes" if models.num_classes else "unconditional",
            s.batch_size,
            ", one row at a time" if s.batch_invariant else "",
            device,
        )
        tmp = Path(out).with_name(Path(out).name + ".tmp")
        if rank == 0:
            tmp.mkdir(parents=True, exist_ok=True)
            _prepare_partial(tmp, settings)
        barrier()
        t_sample = time.perf_counter()
        if map_jobs is not None:
            generated = map_jobs(write_sample_shard, mine, tmp)
        else:
            with tqdm(
                total=sum(j.last - j.first for j in mine),
                unit="img",
                desc=f"sample {variant}",
                dynamic_ncols=True,
                disable=rank != 0,
            ) as bar:
                generated = [write_sample_shard(job, tmp, bar.update) for job in mine]
        sample_seconds = time.perf_counter() - t_sample
        generated = [g for part in gather(generated) for g in part]
        barrier()
        if rank == 0:
            if grid:
                picture = grid_picture(
                    tmp, meta["classes"], models.num_classes > 0, f"{variant} samples, seed {s.seed}"
                )
                partial = Path(grid).with_name(Path(grid).name + ".tmp")
                save_png(picture, partial)
                os.replace(partial, grid)
            promote(tmp, out)
        barrier()
    summary: dict[str, Any] = {
        "n": s.n,
        "generated": sum(generated),
        "shards": n_shards,
        "shards_resumed": sum(1 for g in generated if g == 0),
        "num_classes": models.num_classes,
        "seed": s.seed,
        "batch_size": s.batch_size,
        "batch_invariant": int(s.batch_invariant),
        "world_size": world,
        "sample_seconds": sample_seconds,
        "images_per_s": sum(generated) / sample_seconds if sample_seconds > 0 else 0.0,
        **knob_metrics("gpt", s.gpt_for(variant)),
    }
    if variant == "digit":
        summary |= knob_metrics("renderer", s.renderer)
        summary["renderer_nar"] = int(isinstance(models.renderer, NARRenderer))
    summary["seconds"] = time.perf_counter() - t0
    log.info(
        "sample[%s]: %d images generated at %.2f images/s",
        variant,
        summary["generated"],
        summary["images_per_s"],
    )
    return summary


def sample_images(samples_dir: str, variant: str) -> tuple[ShardImages, dict[str, Any]]:
    """A variant's generated images (streamed from their shards; labels = the class each was drawn for,
    -1 when unconditional) and the flat knobs they were drawn with, read from the samples' own meta.json
    (what was used, not what params say now)."""
    directory = require(samples_dir, f"{variant} samples", f"sample --variant {variant}")
    images = ShardImages(list_shards(directory, "samples"))
    settings = read_json(Path(directory) / RUN_META)
    knobs: dict[str, Any] = {
        f"{variant}_sample_seed": settings["seed"],
        f"{variant}_sample_batch_invariant": int(settings["batch_invariant"]),
        **knob_metrics(f"{variant}_gpt", GPTSampler.model_validate(settings["gpt"])),
    }
    if "renderer" in settings:
        knobs |= knob_metrics(f"{variant}_renderer", RendererSampler.model_validate(settings["renderer"]))
    return images, knobs


def main(argv: list[str] | None = None) -> int:
    return stage_main("sample", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
