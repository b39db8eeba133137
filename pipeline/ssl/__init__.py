"""Self-supervised pretraining of the offline default encoder (a small timm ViT): DINO/iBOT, VICReg, SimCLR.

The names below are imported on first use (PEP 562), so reading the params schema (pipeline/config.py ->
pipeline/ssl/config.py) does not import timm and the training code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "augment_view": "augment",
    "build_ssl_model": "pretrain",
    "build_vit": "vit",
    "crop_thetas": "augment",
    "DINO": "dino",
    "DINOHead": "dino",
    "ENCODER_KIND": "vit",
    "export_encoder": "vit",
    "generator_batches": "data",
    "image_batches": "data",
    "JointEmbedding": "joint",
    "load_encoder": "vit",
    "match_views": "joint",
    "momentum_at": "dino",
    "multi_crop": "augment",
    "OBJECTIVES": "config",
    "pretrain_encoder": "pretrain",
    "sample_patch_grid": "joint",
    "shard_batches": "data",
    "SSLConfig": "config",
    "teacher_temp_at": "dino",
    "train_config": "pretrain",
    "ViewAugment": "augment",
    "vit_kwargs": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"pipeline.ssl.{_EXPORTS[name]}"), name)
