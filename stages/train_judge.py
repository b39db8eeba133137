"""Stage `train_judge`: the offline FID/IS judge — a small CNN classifier trained on the real train images
(pipeline/models/judge.py) with the shared loop. Inception weights cannot be downloaded here, so FID/IS/KID/PR
are measured in this network's features by default; its val accuracy says how much those numbers can mean.

Training images are streamed from the train shards (pipeline/stream.py: one shard decoded at a time), and
the accuracy checks read their images in batches, so memory does not grow with the dataset. Training runs in
`<out>.partial/` (resumed after a kill if the settings and the data are the same) and the final weights are
promoted to `<out>/`, whose config.json also records the val accuracy. Metrics: val and train top-1, final
loss, throughput. With `evaluate.fidelity.extractor: inception-v3-compat` nothing reads a judge: the stage
writes a marker saying so and trains nothing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import Params
from pipeline.evaluation import subset_indices
from pipeline.io import sha256_file
from pipeline.models.judge import (
    Judge,
    JudgeConfig,
    evaluate_accuracy,
    judge_batches,
    load_judge,
    write_unused_marker,
)
from pipeline.prepare import MANIFEST, manifest_classes, read_manifest
from pipeline.runs import train_and_promote
from pipeline.shards import ShardImages, count_samples, list_shards
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import ShardStream
from pipeline.train import rank_world
from stages.train_gpt import train_params

log = logging.getLogger("digit.train_judge")
PATHS = {
    "images": "data/images",
    "out": "models/judge",
    "curves": "reports/curves/train_judge",  # dvclive directory (pipeline/live.py)
    "metrics": "metrics/train_judge.json",
}
TRAIN_ACC_IMAGES = 1000  # train images re-scored after training (to read over-fitting next to val top-1)


def judge_config(params: Params, num_classes: int) -> JudgeConfig:
    p = params.train_judge
    return JudgeConfig(
        num_classes=num_classes,
        image_size=params.base.image_size,
        widths=p.widths,
        stem_stride=p.stem_stride,
        blocks_per_stage=p.blocks_per_stage,
        dropout=p.dropout,
        label_smoothing=p.label_smoothing,
    )


def run(
    params: Params,
    images: str = PATHS["images"],
    out: str = PATHS["out"],
    curves: str | None = PATHS["curves"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = params.train_judge
    if params.evaluate.fidelity.extractor != "judge":
        reason = (
            f"evaluate.fidelity.extractor is {params.evaluate.fidelity.extractor!r}: no stage reads a judge"
        )
        write_unused_marker(out, reason)
        log.info("train_judge: %s; wrote a marker to %s", reason, out)
        return {"trained": 0, "seconds": time.perf_counter() - t0}
    classes = manifest_classes(read_manifest(images))
    train_shards = list_shards(images, "train")
    n_train = sum(count_samples(s) for s in train_shards)
    cfg = judge_config(params, len(classes))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.train.seed)  # the initial weights are a function of the seed alone
        model = Judge(cfg)
    rank, world = rank_world()
    stream = ShardStream(
        train_shards, {"image": "png", "label": "cls"}, p.train.batch_size, p.train.seed, rank, world
    )
    batches = judge_batches(stream, cfg.image_size, p.train.seed, flip=p.flip)
    log.info(
        "train_judge: %d train images, %d classes, %.2fM parameters, %d steps of %d",
        n_train,
        cfg.num_classes,
        sum(t.numel() for t in model.parameters()) / 1e6,
        p.train.steps,
        p.train.batch_size,
    )
    # Everything that must match for a partial run to be resumed rather than restarted.
    run_meta = {
        "kind": "judge",
        "config": asdict(cfg),
        "flip": p.flip,
        "manifest_sha256": sha256_file(Path(images) / MANIFEST),
        "train_params": train_params(p.train),
    }
    fit = train_and_promote(model, batches, p.train, params.base.device, out, run_meta, curves)
    summary: dict[str, Any] = {
        "final_loss": fit["final_loss"],
        "steps": fit["steps"],
        "resumed_from_step": fit["start_step"],
        "train_seconds": fit["seconds"],
        "images_per_s": fit["items_per_s"],
        "world_size": fit["world_size"],
    }
    if rank != 0:
        return summary  # rank 0 alone evaluates the promoted weights

    judge = load_judge(out)
    val = ShardImages(list_shards(images, "val"))
    val_top1 = evaluate_accuracy(judge, val, val.labels)
    # over-fitting check on a seeded subset of train (all of train costs another pass over the data)
    train = ShardImages(train_shards, subset_indices(n_train, TRAIN_ACC_IMAGES, p.train.seed))
    train_top1 = evaluate_accuracy(judge, train, train.labels)
    # Keep the accuracy with the weights: the evaluate stage reports it next to the numbers this judge makes.
    state, saved, _ = load_checkpoint(out)
    save_checkpoint(out, state, {**saved, "val_top1": val_top1, "val_images": len(val)})
    summary |= {
        "val_top1": val_top1,
        "train_top1": train_top1,
        "trained": 1,
        "train_images": n_train,
        "val_images": len(val),
        "num_classes": cfg.num_classes,
        "image_size": cfg.image_size,
        "feature_dim": cfg.feature_dim,
        "params": sum(t.numel() for t in judge.parameters()),
        "seconds": time.perf_counter() - t0,
    }
    log.info("train_judge: val top-1 %.3f, train top-1 %.3f", val_top1, train_top1)
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_judge", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
