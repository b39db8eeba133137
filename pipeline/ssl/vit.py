"""The small ViT the pipeline pretrains, and its export as the tokenizer's encoder.

The backbone is timm's own `VisionTransformer`, built from plain keyword arguments, so the encoder registry
(pipeline/encoders.py, source "ssl") rebuilds it from `meta["timm_kwargs"]` and loads the exported weights
with strict=True. The one extra is the patch stem: "patch" is timm's linear patch embedding, "conv" a small
stack of stride-2 convolutions (Xiao et al. 2021, "Early convolutions help transformers see better"), which
on a few thousand 64-px images learns shape within the CPU budget where the linear stem does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from pipeline.checkpoint import CONFIG_FILE, load_checkpoint, save_checkpoint
from pipeline.ssl.config import STEMS

ENCODER_KIND = "ssl_vit"


class ConvStemPatchEmbed(PatchEmbed):
    """timm's PatchEmbed with the single patch-sized convolution replaced by log2(patch) stride-2 3x3 convs.

    Widths double up to embed_dim, each followed by a GroupNorm(1) (batch-independent, so teacher and student
    see no batch statistics) and GELU; a 1x1 convolution projects to embed_dim. Everything else — dynamic
    image sizes, NHWC output for `_pos_embed`, the final norm — is PatchEmbed's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        p, dim = self.patch_size[0], self.proj.out_channels
        if p != self.patch_size[1] or p < 2 or p & (p - 1):
            raise ValueError(f"conv stem: patch_size must be a power of two >= 2, got {self.patch_size}")
        n = p.bit_length() - 1
        widths = [max(8, dim >> (n - 1 - i)) for i in range(n)]
        layers: list[nn.Module] = []
        c = self.proj.in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.GroupNorm(1, w), nn.GELU()]
            c = w
        layers.append(nn.Conv2d(c, dim, 1))
        self.proj = nn.Sequential(*layers)


def build_vit(kwargs: dict[str, Any], stem: str = "patch", drop_path_rate: float = 0.0) -> VisionTransformer:
    """A VisionTransformer from `vit_kwargs(...)` output and a stem in STEMS; drop path is a training-only extra."""
    if stem not in STEMS:
        raise ValueError(f"ssl encoder: stem must be one of {STEMS}, got {stem!r}")
    extra: dict[str, Any] = {"embed_layer": ConvStemPatchEmbed} if stem == "conv" else {}
    return VisionTransformer(**kwargs, **extra, drop_path_rate=drop_path_rate)


def export_encoder(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write the encoder of a trained SSL model — its `export_backbone`: DINO's teacher, a joint-embedding
    model's backbone — as an encoder checkpoint (model.safetensors + config.json).

    meta: kind "ssl_vit", timm_kwargs, stem, mean, std, img_size, patch_size, steps, and the SSL config it was
    trained with (provenance). The write is atomic (pipeline/checkpoint.py).
    """
    backbone = model.export_backbone
    kwargs = dict(model.timm_kwargs)
    meta = {
        "kind": ENCODER_KIND,
        "timm_kwargs": kwargs,
        "stem": model.cfg.stem,
        "mean": [float(v) for v in model.cfg.mean],
        "std": [float(v) for v in model.cfg.std],
        "img_size": kwargs["img_size"],
        "patch_size": kwargs["patch_size"],
        "steps": int(model.step),
        "ssl_config": model.cfg.to_dict(),
    }
    return save_checkpoint(out_dir, backbone.state_dict(), meta)


def load_encoder(directory: str | Path) -> tuple[VisionTransformer, dict[str, Any]]:
    """(VisionTransformer in eval mode, meta) from an `export_encoder` directory; strict load."""
    state, meta, _ = load_checkpoint(directory)
    where = Path(directory) / CONFIG_FILE
    if meta.get("kind") != ENCODER_KIND:
        raise ValueError(f"{where}: kind is {meta.get('kind')!r}, expected {ENCODER_KIND!r}")
    if "timm_kwargs" not in meta:
        raise ValueError(f"{where}: missing 'timm_kwargs' (the VisionTransformer constructor arguments)")
    vit = build_vit(meta["timm_kwargs"], meta.get("stem", "patch"))
    vit.load_state_dict(state, strict=True)
    return vit.eval(), meta
