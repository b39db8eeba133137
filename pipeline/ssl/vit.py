"""The small ViT the pipeline pretrains, and its export as the tokenizer's encoder.

The backbone is timm's own `VisionTransformer`, built from plain keyword arguments, so the encoder registry
(pipeline/encoders.py, source "ssl") rebuilds it as `VisionTransformer(**meta["timm_kwargs"])` and loads the
exported weights with strict=True — no class of ours is needed to use the encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer

from pipeline.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint

ENCODER_KIND = "ssl_vit"


def vit_kwargs(
    img_size: int = 64,
    patch_size: int = 8,
    embed_dim: int = 192,
    depth: int = 6,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    reg_tokens: int = 0,
) -> dict[str, Any]:
    """Validated, JSON-able timm kwargs of the backbone (everything needed to rebuild it)."""
    if img_size <= 0 or patch_size <= 0 or img_size % patch_size != 0:
        raise ValueError(
            f"ssl encoder: patch_size {patch_size} must divide img_size {img_size} "
            f"(e.g. img_size 64 with patch_size 8 gives an 8x8 grid of patches)"
        )
    if embed_dim % num_heads != 0:
        raise ValueError(f"ssl encoder: embed_dim {embed_dim} must be a multiple of num_heads {num_heads}")
    if depth < 1 or reg_tokens < 0:
        raise ValueError(f"ssl encoder: need depth >= 1 and reg_tokens >= 0, got {depth} and {reg_tokens}")
    return {
        "img_size": int(img_size),
        "patch_size": int(patch_size),
        "embed_dim": int(embed_dim),
        "depth": int(depth),
        "num_heads": int(num_heads),
        "mlp_ratio": float(mlp_ratio),
        "reg_tokens": int(reg_tokens),
        "num_classes": 0,
        # "token" keeps the final LayerNorm on every token (an "avg" pool would move it to fc_norm and
        # leave patch features unnormalised); the tokenizer reads patch tokens through that norm.
        "global_pool": "token",
        "class_token": True,
        # Local crops are smaller than img_size: timm then interpolates the position table.
        "dynamic_img_size": True,
    }


def build_vit(kwargs: dict[str, Any], drop_path_rate: float = 0.0) -> VisionTransformer:
    """A VisionTransformer from `vit_kwargs(...)` output; drop path is a training-only extra."""
    return VisionTransformer(**kwargs, drop_path_rate=drop_path_rate)


def export_encoder(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the TEACHER backbone of a trained `DINO` as an encoder checkpoint (model.safetensors + config.json).

    meta: kind "ssl_vit", timm_kwargs, mean, std, img_size, patch_size, steps, and the SSL config it was
    trained with (provenance). The write is atomic (pipeline/checkpoint.py).
    """
    teacher = model.teacher_backbone
    kwargs = dict(model.timm_kwargs)
    meta = {
        "kind": ENCODER_KIND,
        "timm_kwargs": kwargs,
        "mean": [float(v) for v in model.cfg.mean],
        "std": [float(v) for v in model.cfg.std],
        "img_size": kwargs["img_size"],
        "patch_size": kwargs["patch_size"],
        "steps": int(model.step),
        "ssl_config": model.cfg.to_dict(),
    }
    return save_checkpoint(out_dir, teacher.state_dict(), meta)


def load_encoder(directory: str | Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """(VisionTransformer in eval mode, meta) from an `export_encoder` directory; strict load."""
    state, meta, _ = load_checkpoint(directory)
    where = Path(directory) / CONFIG_FILE
    if meta.get("kind") != ENCODER_KIND:
        raise ValueError(f"{where}: kind is {meta.get('kind')!r}, expected {ENCODER_KIND!r}")
    if "timm_kwargs" not in meta:
        raise ValueError(f"{where}: missing 'timm_kwargs' (the VisionTransformer constructor arguments)")
    vit = VisionTransformer(**meta["timm_kwargs"])
    vit.load_state_dict(state, strict=True)
    return vit.eval(), meta
