"""Stage `pretrain_encoder`: self-supervised (DINO / optional iBOT) pretraining of a small ViT on the train
images — the offline default encoder of the tokenizer (encoder.source: ssl). Reports, for the pretrained
encoder and for the same ViT at random init side by side: k-NN val accuracy of mean-pooled patch features, and
the DiGIT token change rate at 10 dB SNR (a K-Means codebook of kmeans.k fitted on each encoder's own
features; the stability protocol of the evaluate stage)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.assign import assign
from pipeline.config import Params
from pipeline.evaluation import load_images, subset_indices
from pipeline.kmeans import fit_kmeans, sample_rows
from pipeline.metrics.knn import knn_accuracy, mean_patch_features, patch_features, to_float_images
from pipeline.metrics.stability import stability_table
from pipeline.ssl.dino import SSLConfig
from pipeline.ssl.pretrain import pretrain_encoder
from pipeline.ssl.vit import build_vit, load_encoder
from pipeline.stage import MapJobs, stage_main

log = logging.getLogger("digit.pretrain_encoder")
PATHS = {
    "images": "data/images",
    "out": "models/encoder",
    "curves": "reports/curves/pretrain_encoder",  # dvclive directory (pipeline/live.py)
    "metrics": "metrics/pretrain_encoder.json",
}
PROBE_TRAIN, PROBE_VAL = 2000, 500  # images for the k-NN check (enough to separate, cheap on CPU)
STABILITY_SNR_DB, STABILITY_VAL = 10.0, 200


def ssl_config(params: Params) -> SSLConfig:
    return SSLConfig(img_size=params.base.image_size, **params.pretrain_encoder.model_dump())


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def encoder_checks(
    vit: torch.nn.Module, cfg: SSLConfig, train, val, layer: int, params: Params
) -> tuple[float, float]:
    """(k-NN val top-1 of mean-pooled patch features, DiGIT token change rate at STABILITY_SNR_DB) of `vit`.

    The train patch features serve both: their means for the k-NN, the patches themselves for a K-Means of
    kmeans.k (seeds from params); noise is added to `val` images in [-1, 1] as in the evaluate stage."""
    vit.eval()
    with torch.inference_mode():
        batches = range(0, len(train[0]), 256)
        feats = torch.cat(
            [
                patch_features(vit, to_float_images(nchw(train[0][i : i + 256]), cfg.mean, cfg.std), layer)
                for i in batches
            ]
        )
        val_mean = mean_patch_features(vit, nchw(val[0]), cfg.mean, cfg.std, layer)
    knn = knn_accuracy(feats.mean(dim=1), train[1], val_mean, val[1])

    patches = feats.flatten(0, 1)
    k = params.kmeans
    rows = sample_rows(len(patches), min(len(patches), k.sample_patches), k.seed)
    centroids = torch.from_numpy(
        fit_kmeans(
            patches[rows].numpy(), k.k, k.niter, k.seed, k.max_points_per_centroid, gpu=False
        ).centroids
    )

    def tokenize(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = patch_features(vit, to_float_images((images + 1) / 2, cfg.mean, cfg.std), layer).float()
        return assign(f, centroids), f

    images = nchw(val[0][:STABILITY_VAL]).float() / 127.5 - 1
    (row,) = stability_table(
        tokenize, images, [STABILITY_SNR_DB], seed=params.evaluate.stability.seed, progress=False
    )
    return knn, row["change_rate"]


def run(
    params: Params,
    images: str = PATHS["images"],
    out: str = PATHS["out"],
    curves: str | None = PATHS["curves"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    cfg = ssl_config(params)
    train_images, train_labels = load_images(images, "train")
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
    # seeded subsets, not the first N: ImageFolder shards are written in class order
    probe = subset_indices(len(train_images), PROBE_TRAIN, cfg.seed)
    train = train_images[probe], train_labels[probe]
    val = load_images(images, "val", PROBE_VAL, cfg.seed)
    ssl_vit, _ = load_encoder(out)
    torch.manual_seed(cfg.seed)
    random_vit = build_vit(cfg.timm_kwargs(), cfg.stem)  # the init DINO starts from (same seed)
    knn_ssl, change_ssl = encoder_checks(ssl_vit, cfg, train, val, layer, params)
    knn_random, change_random = encoder_checks(random_vit, cfg, train, val, layer, params)
    log.info(
        "layer %d, SSL vs random init: k-NN val top-1 of mean-pooled patch features %.3f vs %.3f; "
        "DiGIT token change rate at %g dB SNR %.3f vs %.3f",
        layer,
        knn_ssl,
        knn_random,
        STABILITY_SNR_DB,
        change_ssl,
        change_random,
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
        "change_rate_10db_ssl": change_ssl,
        "change_rate_10db_random": change_random,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain_encoder", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
