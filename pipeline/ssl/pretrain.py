"""Pretrain the offline default encoder: DINO/iBOT on an in-memory image array with the shared `fit` loop,
then export the teacher backbone for the tokenizer (pipeline/encoders.py, source "ssl")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.ssl.dino import DINO, SSLConfig
from pipeline.ssl.vit import export_encoder
from pipeline.train import TrainConfig, fit, rank_world


def image_batches(
    images: np.ndarray, batch_size: int, seed: int
) -> Callable[[int], Iterator[dict[str, torch.Tensor]]]:
    """`batches(start_step)` for `fit`: this rank's share of global batch `batch_size` at each step.

    images: uint8 [N, H, W, 3]. The sample stream is epoch after epoch of a permutation drawn from
    (seed, epoch), so the batch of step s is a function of (seed, s, rank, world) and a resume is exact.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images: expected uint8 [N, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    n = len(images)
    if n == 0:
        raise ValueError("images: empty; SSL pretraining needs at least one image")

    def batches(start: int) -> Iterator[dict[str, torch.Tensor]]:
        rank, world = rank_world()
        if batch_size % world != 0:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world}")
        per_rank = batch_size // world
        perms: dict[int, np.ndarray] = {}

        def perm(epoch: int) -> np.ndarray:
            if epoch not in perms:
                if len(perms) > 2:
                    perms.clear()
                perms[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
            return perms[epoch]

        step = start
        while True:
            pos = np.arange(step * batch_size + rank * per_rank, step * batch_size + (rank + 1) * per_rank)
            epochs, offsets = pos // n, pos % n
            # pos is increasing, so concatenating epoch by epoch keeps the stream order
            idx = np.concatenate([perm(int(e))[offsets[epochs == e]] for e in np.unique(epochs)])
            yield {"image": torch.from_numpy(images[idx]).permute(0, 3, 1, 2).contiguous()}
            step += 1

    return batches


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
    images: np.ndarray,
    cfg: SSLConfig,
    run_dir: str | Path,
    out_dir: str | Path,
    log_path: str | Path | None = None,
    device: str = "auto",
    checkpoint_every: int | None = None,
    progress: bool = True,
) -> tuple[DINO, dict[str, Any]]:
    """Train DINO (resuming from run_dir/last if present) and export the teacher backbone to out_dir.

    Returns the trained module and fit's summary plus images_per_s (source images, not crops), minutes
    and the encoder directory.
    """
    model = DINO(cfg)
    meta = {"kind": "ssl_pretrain", "config": cfg.to_dict()}
    summary = fit(
        model,
        image_batches(images, cfg.batch_size, cfg.seed),
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
