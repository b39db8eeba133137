"""Stage `train_gpt`: the stage-1 GPT over DiGIT tokens (variant `digit`), or the same recipe trained directly
on the pixel VQ tokens (variant `vq`: the paper's "VQGAN tokens, AR" baseline).

One code path: the variant only picks the token field, vocabulary and grid from the token shards' meta.json.
Training runs in `<out>.partial/` (resumed after a kill if the settings and the training tokens are the same)
and the final weights are promoted to `<out>/`. Metrics: final training loss, teacher-forced val loss,
NLL and accuracy of the saved model, parameter count and throughput.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from pipeline.config import Params, Train
from pipeline.io import sha256_files
from pipeline.models.gpt import GPT, gpt_config, load_gpt
from pipeline.runs import train_and_promote
from pipeline.shards import iter_samples, list_shards
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import TOKEN_META, ShardStream, read_token_meta, token_views
from pipeline.train import rank_world, resolve_device

log = logging.getLogger("digit.train_gpt")
VARIANTS = ("digit", "vq")
PATHS = {
    "variant": "digit",
    "tokens": "data/tokens",
    "out": "models/gpt_{variant}",
    "curves": "reports/curves/train_gpt_{variant}",  # dvclive directory (pipeline/live.py)
    "metrics": "metrics/train_gpt_{variant}.json",
}


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(
            f"variant {variant!r}: expected one of {list(VARIANTS)} (digit: DiGIT tokens, vq: pixel-VQ tokens)"
        )
    return variant


def fill_variant(path: str | None, variant: str) -> str | None:
    """Fill a "{variant}" placeholder (the CLI does it; callers like the Prefect flow pass PATHS as is)."""
    return path.format(variant=variant) if path else path


def token_spec(meta: dict[str, Any], variant: str) -> tuple[str, int, tuple[int, int]]:
    """(sample field, vocabulary size, grid) of a variant's tokens, from the token shards' meta.json."""
    spec = meta[check_variant(variant)]
    return spec["field"], int(spec["vocab"]), (int(spec["grid"][0]), int(spec["grid"][1]))


def tokens_fingerprint(tokens_dir: str | Path, split: str = "train") -> str:
    """sha256 over a split's token shards and meta.json: a partial run only resumes on the same data."""
    return sha256_files([*list_shards(tokens_dir, split), Path(tokens_dir) / TOKEN_META])


def val_batches(
    tokens_dir: str | Path, fields: dict[str, str], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The val split in shard order, as int64 batches {name: [B, h·w] grids or [B] labels}."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in fields}
    for s in iter_samples(list_shards(tokens_dir, "val")):
        for name, field in fields.items():
            rows[name].append(torch.as_tensor(s[field]).long().reshape(-1 if field.endswith("npy") else ()))
        if len(rows[next(iter(fields))]) == batch_size:
            yield {name: torch.stack(v) for name, v in rows.items()}
            rows = {name: [] for name in fields}
    if rows[next(iter(fields))]:
        yield {name: torch.stack(v) for name, v in rows.items()}


@contextlib.contextmanager
def _no_label_smoothing(model: nn.Module) -> Iterator[None]:
    # training_loss reads config.label_smoothing at call time; the plain NLL needs it at 0.
    config = model.config
    model.config = dataclasses.replace(config, label_smoothing=0.0)
    try:
        yield
    finally:
        model.config = config


@torch.no_grad()
def evaluate_teacher_forced(
    model: nn.Module, batches: Iterator[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Mean val loss (the training objective), NLL (no label smoothing) and next-token accuracy.

    Eval mode: no dropout and no class dropout, so class-conditional models see the true labels.
    """
    model.eval()
    totals = {"loss": 0.0, "nll": 0.0, "acc": 0.0}
    n = 0
    bar = tqdm(desc="val", unit="seq", dynamic_ncols=True)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = next(iter(batch.values())).shape[0]
        bar.update(rows)
        loss, logs = model.training_loss(batch)
        with _no_label_smoothing(model):
            nll, _ = model.training_loss(batch)
        totals["loss"] += float(loss) * rows
        totals["nll"] += float(nll) * rows
        totals["acc"] += float(logs["acc"]) * rows
        n += rows
    bar.close()
    if n == 0:
        raise ValueError("evaluate_teacher_forced: the val split has no samples")
    return {f"val_{k}": v / n for k, v in totals.items()} | {"val_sequences": n}


def train_params(train: Train) -> dict[str, Any]:
    """The training knobs that change the weights (not how often we checkpoint or log)."""
    return train.model_dump(mode="json", exclude={"checkpoint_every", "log_every"})


def train_summary(fit: dict[str, Any], seq_len: int) -> dict[str, Any]:
    return {
        "final_loss": fit["final_loss"],
        "steps": fit["steps"],
        "resumed_from_step": fit["start_step"],
        "train_seconds": fit["seconds"],
        "sequences_per_s": fit["items_per_s"],
        "tokens_per_s": fit["items_per_s"] * seq_len,
        "world_size": fit["world_size"],
    }


def build_gpt(params: Params, meta: dict[str, Any], variant: str) -> GPT:
    m = params.train_gpt.model_for(variant)
    _, vocab, (h, w) = token_spec(meta, variant)
    num_classes = int(meta["num_classes"]) if m.class_conditional else 0
    config = gpt_config(
        m.size,
        vocab,
        h * w,
        num_classes,
        class_dropout=m.class_dropout if num_classes else 0.0,
        **m.overrides(),
    )
    return GPT(config, seed=params.train_gpt.train_for(variant).seed)


def run(
    params: Params,
    variant: str = PATHS["variant"],
    tokens: str = PATHS["tokens"],
    out: str = PATHS["out"],
    curves: str | None = PATHS["curves"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    check_variant(variant)
    out, curves = fill_variant(out, variant), fill_variant(curves, variant)
    train = params.train_gpt.train_for(variant)
    meta = read_token_meta(tokens)
    field, vocab, (h, w) = token_spec(meta, variant)
    model = build_gpt(params, meta, variant)
    conditional = model.config.num_classes > 0
    fields = {"tokens": field, "label": "cls"} if conditional else {"tokens": field}
    rank, world = rank_world()
    # With V augmented views per image, each sample gives one view per epoch; val uses view 0.
    num_views, views = token_views(meta)
    stream = ShardStream(
        list_shards(tokens, "train"), fields, train.batch_size, train.seed, rank, world, views, num_views
    )
    log.info(
        "train_gpt[%s]: %d train sequences (%d view(s) each) of %d tokens (vocab %d), %.2fM parameters, "
        "%d steps of %d",
        variant,
        stream.epoch_size,
        num_views,
        h * w,
        vocab,
        model.num_params() / 1e6,
        train.steps,
        train.batch_size,
    )
    # Everything that must match for a partial run to be resumed rather than restarted.
    run_meta = {
        **model.checkpoint_meta(),
        "variant": variant,
        "tokens_field": field,
        "tokens_sha256": tokens_fingerprint(tokens),
        "train_params": train_params(train),
    }
    batches: Callable[[int], Iterator[dict[str, torch.Tensor]]] = stream.batches
    fit = train_and_promote(model, batches, train, params.base.device, out, run_meta, curves)
    summary = train_summary(fit, h * w)
    if rank != 0:
        return summary  # rank 0 alone evaluates the promoted weights
    device = resolve_device(params.base.device)
    trained = load_gpt(out, map_location=str(device))
    summary |= evaluate_teacher_forced(trained, val_batches(tokens, fields, train.batch_size), device)
    summary |= {
        "params": trained.num_params(),
        "vocab": vocab,
        "seq_len": h * w,
        "num_classes": trained.config.num_classes,
        "seconds": time.perf_counter() - t0,
    }
    log.info(
        "train_gpt[%s]: final loss %.4f, val loss %.4f, val NLL %.4f, val acc %.3f",
        variant,
        summary["final_loss"],
        summary["val_loss"],
        summary["val_nll"],
        summary["val_acc"],
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_gpt", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
