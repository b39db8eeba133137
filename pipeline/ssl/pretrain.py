"""Pretrain the offline default encoder with the shared `fit` loop on a stream of images (pipeline/ssl/data.py),
then export the backbone for the tokenizer (pipeline/encoders.py, source "ssl")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pipeline.ssl.config import SSLConfig
from pipeline.ssl.data import Batches
from pipeline.ssl.dino import DINO
from pipeline.ssl.joint import JointEmbedding
from pipeline.ssl.vit import export_encoder
from pipeline.train import TrainConfig, fit, rank_world


def build_ssl_model(cfg: SSLConfig) -> DINO | JointEmbedding:
    """The module that trains `cfg.objective`: DINO (dino, iBOT) or JointEmbedding (vicreg, simclr)."""
    return DINO(cfg) if cfg.objective == "dino" else JointEmbedding(cfg)


def train_config(cfg: SSLConfig, device: str = "auto", checkpoint_every: int | None = None) -> TrainConfig:
    """The shared loop's settings for an SSL run (AdamW betas as in DINO: (0.9, 0.999))."""
    return TrainConfig(
        steps=cfg.steps,
        lr=cfg.lr,
        warmup_steps=cfg.warmup_steps,
        schedule="cosine",
        min_lr_ratio=cfg.min_lr_ratio,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.999),
        grad_clip=cfg.grad_clip,
        checkpoint_every=checkpoint_every or cfg.steps,
        seed=cfg.seed,
        amp="off",
        device=device,
    )


def pretrain_encoder(
    batches: Batches,
    cfg: SSLConfig,
    run_dir: str | Path,
    out_dir: str | Path,
    log_path: str | Path | None = None,
    device: str = "auto",
    checkpoint_every: int | None = None,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train cfg.objective on `batches` (resuming from run_dir/last if present) and export the encoder
    (DINO's teacher backbone, a joint-embedding model's backbone) to out_dir.

    Returns the trained module and fit's summary plus images_per_s (source images, not crops), minutes
    and the encoder directory.
    """
    model = build_ssl_model(cfg)
    meta = {"kind": "ssl_pretrain", "config": cfg.to_dict()}
    summary = fit(
        model,
        batches,
        train_config(cfg, device, checkpoint_every),
        Path(run_dir),
        meta,
        log_path=Path(log_path) if log_path is not None else None,
        progress=progress,
    )
    model.cpu()
    if rank_world()[0] == 0:
        export_encoder(model, out_dir)
    summary = dict(summary)
    summary["images_per_s"] = summary["items_per_s"]
    summary["minutes"] = summary["seconds"] / 60.0
    summary["encoder_dir"] = str(out_dir)
    return model, summary
