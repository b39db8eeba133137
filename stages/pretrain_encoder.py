"""Stage `pretrain_encoder`: self-supervised pretraining of a small ViT on the train images — the offline default
encoder of the tokenizer (encoder.source: ssl). The objective is pretrain_encoder.objective (pipeline/ssl/):
VICReg or SimCLR, optionally with a dense term on the tokenizer's patch features, or DINO/iBOT.

Images are streamed, never loaded whole: from the train shards, or — built-in data with fresh_images — from
the generator's train split, which gives new images every step. Reports, for the pretrained encoder and the
same ViT at its random init (the weights training starts from) side by side:
  knn_top1_*            k-NN val top-1 of mean-pooled patch features of block encoder.layer (seeded subsets
                        of 2000 train / 500 val images);
  tokens_*_top1_*       bag-of-tokens probes: a K-Means of kmeans.k on each encoder's own train patch
                        features turns every image into a histogram of its DiGIT tokens; linear-probe and
                        k-NN val top-1 on those histograms (how much class information the tokens carry);
  change_rate_<snr>_*   the DiGIT token change rate at every SNR of evaluate.stability.snrs_db (the evaluate
                        stage's protocol and val subset), with that codebook.
With encoder.source timm, file or random the tokenizer does not read this stage's encoder: nothing is
trained, and models/encoder holds only a config.json marker saying so. With source file and an encoder
directory (the project's published encoder, published/encoder) the stage still reports the checks above, of
that encoder against the random init of the recipe it was trained with (its config.json), in ~10 s.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.assign import assign
from pipeline.config import Params
from pipeline.encoders import is_encoder_dir
from pipeline.evaluation import load_images
from pipeline.io import atomic_dir, write_json
from pipeline.kmeans import fit_kmeans, sample_rows
from pipeline.metrics.knn import knn_accuracy, patch_features, to_float_images
from pipeline.metrics.probe import ProbeConfig, linear_probe
from pipeline.metrics.stability import snr_key, stability_table
from pipeline.shards import count_samples, list_shards
from pipeline.ssl.config import SSLConfig
from pipeline.ssl.data import Batches, generator_batches, shard_batches
from pipeline.ssl.pretrain import build_ssl_model, pretrain_encoder
from pipeline.ssl.vit import load_encoder
from pipeline.stage import MapJobs, stage_main

log = logging.getLogger("digit.pretrain_encoder")
PATHS = {
    "images": "data/images",
    "out": "models/encoder",
    "curves": "reports/curves/pretrain_encoder",  # dvclive directory (pipeline/live.py)
    "metrics": "metrics/pretrain_encoder.json",
}
PROBE_TRAIN, PROBE_VAL = 2000, 500  # images for the k-NN check (enough to separate, cheap on CPU)
UNUSED_KIND = "unused"  # config.json kind of the marker written when the encoder comes from elsewhere


def ssl_config(params: Params) -> SSLConfig:
    return SSLConfig(img_size=params.base.image_size, **params.pretrain_encoder.model_dump())


def nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def training_batches(params: Params, cfg: SSLConfig, images: str) -> tuple[Batches, str]:
    """(the batch stream, a description): the generator for built-in data with fresh_images, else the
    train shards."""
    if cfg.fresh_images and params.prepare.source == "builtin":
        b = params.base
        return generator_batches(b.image_size, b.seed, b.num_classes, cfg.batch_size), (
            f"fresh built-in train images (generator seed {b.seed}), {cfg.steps * cfg.batch_size} in all"
        )
    if cfg.fresh_images:
        log.info("pretrain_encoder: fresh_images needs the built-in generator; streaming the train shards")
    shards = list_shards(images, "train")
    n = sum(count_samples(s) for s in shards)
    epochs = cfg.steps * cfg.batch_size / n
    return shard_batches(shards, cfg.batch_size, cfg.seed), f"{n} train images ({epochs:.1f} epochs)"


def token_histograms(tokens: torch.Tensor, k: int) -> torch.Tensor:
    """Per-image token frequencies [N, k] (float32, rows sum to 1) of tokens [N, T]."""
    n, t = tokens.shape
    counts = torch.zeros(n, k).scatter_add_(1, tokens.long(), torch.ones(n, t))
    return counts / t


def encoder_report(
    vit: torch.nn.Module,
    cfg: SSLConfig,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    stability_images: np.ndarray,
    params: Params,
) -> dict[str, float]:
    """The stage's checks of one encoder (module docstring): k-NN, bag-of-tokens probes, stability."""
    layer, k, st = params.encoder.layer, params.kmeans, params.evaluate.stability
    vit.eval()

    def feats_of(images: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat(
                [
                    patch_features(vit, to_float_images(nchw(images[i : i + 256]), cfg.mean, cfg.std), layer)
                    for i in range(0, len(images), 256)
                ]
            )

    train_feats, val_feats = feats_of(train[0]), feats_of(val[0])
    out = {"knn": knn_accuracy(train_feats.mean(dim=1), train[1], val_feats.mean(dim=1), val[1])}

    patches = train_feats.flatten(0, 1)
    rows = sample_rows(len(patches), min(len(patches), k.sample_patches), k.seed)
    centroids = torch.from_numpy(
        fit_kmeans(
            patches[rows].numpy(), k.k, k.niter, k.seed, k.max_points_per_centroid, gpu=False
        ).centroids
    )
    train_hist = token_histograms(assign(train_feats, centroids), k.k)
    val_tokens = assign(val_feats, centroids)
    val_hist = token_histograms(val_tokens, k.k)
    probe = linear_probe(train_hist, train[1], val_hist, val[1], ProbeConfig(seed=cfg.seed))
    out["tokens_linear"] = probe.val_top1
    out["tokens_knn"] = knn_accuracy(train_hist, train[1], val_hist, val[1])
    out["codes_used"] = float(len(torch.unique(val_tokens)))

    def tokenize(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = patch_features(vit, to_float_images((images + 1) / 2, cfg.mean, cfg.std), layer).float()
        return assign(f, centroids), f

    x = nchw(stability_images).float() / 127.5 - 1
    with torch.inference_mode():
        table = stability_table(
            tokenize, x, st.snrs_db, seed=st.seed, batch_size=st.batch_size, progress=False
        )
    for row in table:
        out[f"change_rate_{snr_key(row['snr_db'])}"] = row["change_rate"]
    return out


def write_unused_marker(params: Params, out: str) -> dict[str, Any]:
    """models/encoder for an encoder that comes from elsewhere: one config.json saying so (atomic)."""
    enc = params.encoder
    reason = (
        f"encoder.source is {enc.source!r} (name {enc.name!r}, weights {enc.weights!r}): the tokenizer does not "
        "read this directory, so pretrain_encoder trained nothing; set encoder.source: ssl to train one"
    )
    with atomic_dir(out) as tmp:
        write_json(tmp / "config.json", {"kind": UNUSED_KIND, "encoder_source": enc.source, "reason": reason})
    log.info("pretrain_encoder: %s", reason)
    return {"trained": 0, "steps": 0, "train_seconds": 0.0}


def write_untrained_curves(curves: str, published_curves: Path | None) -> None:
    """The stage's dvclive outputs when it trains nothing: the published encoder's own training curves where
    they were published with it, else a curve with no steps (dvc.yaml declares the outputs either way)."""
    with atomic_dir(curves) as tmp:
        if published_curves is not None and (published_curves / "metrics.json").is_file():
            shutil.copytree(published_curves, tmp, dirs_exist_ok=True)
            return
        (tmp / "plots" / "metrics").mkdir(parents=True)
        (tmp / "plots" / "metrics" / "loss.tsv").write_text("step\tloss\n")
        write_json(tmp / "metrics.json", {})


def compare_with_random_init(
    ssl_vit: torch.nn.Module, random_vit: torch.nn.Module, cfg: SSLConfig, params: Params, images: str
) -> dict[str, Any]:
    """The stage's checks (module docstring) of the pretrained encoder and of its random init, side by side."""
    # seeded subsets, not the first N: ImageFolder shards are written in class order
    train = load_images(images, "train", PROBE_TRAIN, cfg.seed)
    val = load_images(images, "val", PROBE_VAL, cfg.seed)
    st = params.evaluate.stability
    stability_images, _ = load_images(images, "val", st.images, st.seed)
    reports = {
        name: encoder_report(vit, cfg, train, val, stability_images, params)
        for name, vit in (("ssl", ssl_vit), ("random", random_vit))
    }
    metrics_out: dict[str, Any] = {"knn_layer": params.encoder.layer, "kmeans_k": params.kmeans.k}
    for key in reports["ssl"]:
        name = {"knn": "knn_top1", "tokens_linear": "tokens_linear_top1", "tokens_knn": "tokens_knn_top1"}
        base = name.get(key, key)
        metrics_out[f"{base}_ssl"] = reports["ssl"][key]
        metrics_out[f"{base}_random"] = reports["random"][key]
    for key in ("knn", "tokens_linear", "tokens_knn"):
        metrics_out[f"{key}_gain_points"] = 100 * (reports["ssl"][key] - reports["random"][key])
    changes = [k for k in reports["ssl"] if k.startswith("change_rate_")]
    metrics_out["stability_wins"] = sum(reports["ssl"][k] < reports["random"][k] for k in changes)
    metrics_out["stability_snrs"] = len(changes)
    log.info(
        "layer %d, SSL vs random init: k-NN %.3f vs %.3f; bag-of-tokens linear %.3f vs %.3f, k-NN %.3f vs "
        "%.3f; change rate lower at %d of %d SNRs (%s)",
        params.encoder.layer,
        reports["ssl"]["knn"],
        reports["random"]["knn"],
        reports["ssl"]["tokens_linear"],
        reports["random"]["tokens_linear"],
        reports["ssl"]["tokens_knn"],
        reports["random"]["tokens_knn"],
        metrics_out["stability_wins"],
        len(changes),
        ", ".join(f"{k[12:]} {reports['ssl'][k]:.3f}/{reports['random'][k]:.3f}" for k in changes),
    )
    return metrics_out


def check_published(params: Params, images: str) -> dict[str, Any]:
    """encoder.source file with an encoder directory (the published encoder): nothing to train, but the same
    checks as a trained one, against the random init its recipe (config.json ssl_config) started from."""
    weights = str(params.encoder.weights)
    vit, meta = load_encoder(weights)
    if "ssl_config" not in meta:
        raise ValueError(f"{Path(weights) / 'config.json'}: no 'ssl_config' (the recipe it was trained with)")
    cfg = SSLConfig.from_dict(meta["ssl_config"], source=f"{weights}/config.json ssl_config")
    log.info(
        "pretrain_encoder: checking the encoder in %s (%d steps of %s)", weights, meta["steps"], cfg.objective
    )
    random_vit = build_ssl_model(cfg).export_backbone
    checks = compare_with_random_init(vit, random_vit, cfg, params, images)
    return {"steps": int(meta["steps"]), "published": 1} | checks


def run(
    params: Params,
    images: str = PATHS["images"],
    out: str = PATHS["out"],
    curves: str | None = PATHS["curves"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    if params.encoder.source != "ssl":
        marker = write_unused_marker(params, out)
        published = params.encoder.source == "file" and is_encoder_dir(params.encoder.weights)
        if curves:
            write_untrained_curves(
                curves, Path(str(params.encoder.weights)) / "curves" if published else None
            )
        if published:
            return marker | check_published(params, images)
        return marker
    cfg = ssl_config(params)
    batches, source = training_batches(params, cfg, images)
    log.info(
        "pretrain_encoder: %s on %s; %d steps of %d, ViT d=%d depth=%d patch=%d",
        cfg.objective,
        source,
        cfg.steps,
        cfg.batch_size,
        cfg.embed_dim,
        cfg.depth,
        cfg.patch_size,
    )
    partial = Path(out + ".partial")
    if curves:
        Path(curves).parent.mkdir(parents=True, exist_ok=True)
    random_vit = build_ssl_model(cfg).export_backbone  # the weights training starts from
    _, summary = pretrain_encoder(
        batches,
        cfg,
        partial,
        out,
        curves,
        device=params.base.device,
        checkpoint_every=max(50, cfg.steps // 4),
    )
    shutil.rmtree(partial, ignore_errors=True)

    ssl_vit, _ = load_encoder(out)
    return {
        "trained": 1,
        "steps": summary["steps"],
        "final_loss": summary["final_loss"],
        "train_seconds": summary["seconds"],
        "images_per_s": summary["images_per_s"],
    } | compare_with_random_init(ssl_vit, random_vit, cfg, params, images)


def main(argv: list[str] | None = None) -> int:
    return stage_main("pretrain_encoder", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
