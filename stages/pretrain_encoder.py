"""Stage `pretrain_encoder`: self-supervised (DINO / optional iBOT) pretraining of a small ViT on the train
images — the offline default encoder of the tokenizer (encoder.source: ssl). Reports k-NN val accuracy of
mean-pooled patch features for the pretrained encoder and for the same ViT at random init, side by side."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.metrics.knn import knn_accuracy, mean_patch_features
from pipeline.shards import iter_samples, list_shards
from pipeline.ssl.dino import SSLConfig
from pipeline.ssl.pretrain import pretrain_encoder
from pipeline.ssl.vit import build_vit, load_encoder
from pipeline.stage import MapJobs, stage_main

log = logging.getLogger("digit.pretrain_encoder")
PATHS = {
    "images": "data/images",
    "out": "models/encoder",
    "curves": "reports/curves/pretrain_encoder.tsv",
    "metrics": "metrics/pretrain_encoder.json",
}
PROBE_TRAIN, PROBE_VAL = 2000, 500  # images for the k-NN check (enough to separate, cheap on CPU)


def load_split(images_dir: str | Path, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for s in iter_samples(list_shards(images_dir, split)):
        images.append(s["png"])
        labels.append(s["cls"])
        if limit and len(images) == limit:
            break
    return np.stack(images), np.asarray(labels)


def ssl_config(params: Params) -> SSLConfig:
    return SSLConfig(img_size=params.base.image_size, **params.pretrain_encoder.model_dump())


def knn_check(vit: torch.nn.Module, cfg: SSLConfig, train, val, layer: int) -> float:
    to_nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731
    with torch.inference_mode():
        ftr = mean_patch_features(vit, to_nchw(train[0]), cfg.mean, cfg.std, layer)
        fva = mean_patch_features(vit, to_nchw(val[0]), cfg.mean, cfg.std, layer)
    return knn_accuracy(ftr, train[1], fva, val[1])


def run(
    params: Params,
    images: str = PATHS["images"],
    out: str = PATHS["out"],
    curves: str | None = PATHS["curves"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    cfg = ssl_config(params)
    train_images, _ = load_split(images, "train")
    log.info(
        "pretrain_encoder: %d train images, %d steps of %d, ViT d=%d depth=%d patch=%d",
        len(train_images),
        cfg.steps,
        cfg.batch_size,
        cfg.embed_dim,
        cfg.depth,
        cfg.patch_size,
    )
    partial = Path(out + ".partial")
    if curves:
        Path(curves).parent.mkdir(parents=True, exist_ok=True)
    _, summary = pretrain_encoder(
        train_images,
        cfg,
        partial,
        out,
        curves,
        device=params.base.device,
        checkpoint_every=max(50, cfg.steps // 4),
    )
    shutil.rmtree(partial, ignore_errors=True)

    layer = params.encoder.layer
    train = load_split(images, "train", PROBE_TRAIN)
    val = load_split(images, "val", PROBE_VAL)
    ssl_vit, _ = load_encoder(out)
    torch.manual_seed(cfg.seed)
    random_vit = build_vit(cfg.timm_kwargs(), cfg.stem)  # the init DINO starts from (same seed)
    knn_ssl = knn_check(ssl_vit, cfg, train, val, layer)
    knn_random = knn_check(random_vit, cfg, train, val, layer)
    log.info(
        "k-NN val top-1 of mean-pooled layer-%d patch features: SSL %.3f vs random init %.3f",
        layer,
        knn_ssl,
        knn_random,
    )
    return {
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "train_seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
        "knn_top1_ssl": knn_ssl,
        "knn_top1_random": knn_random,
        "knn_gain_points": 100 * (knn_ssl - knn_random),
        "knn_layer": layer,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain_encoder", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
