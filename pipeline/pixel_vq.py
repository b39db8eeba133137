"""The pixel tokenizer behind `models/vq/`: our trained VQModel or an imported taming/MAGE VQGAN, both
saved as safetensors + JSON and exposing encode(images [-1, 1]) → ids [B, h, w] and decode(ids)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.models.taming import TamingConfig, TamingVQGAN, load_taming_vqgan
from pipeline.models.vq import load_vq

TAMING_KIND = "taming_vqgan"


def import_vqgan(path: str | Path, out: str | Path) -> TamingVQGAN:
    """Load a pretrained taming/MAGE checkpoint and store it in our format at `out`."""
    vq = load_taming_vqgan(path)
    save_checkpoint(
        out, vq.state_dict(), {"kind": TAMING_KIND, "config": asdict(vq.cfg), "source": str(path)}
    )
    return vq


def load_pixel_vq(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    state, meta, _ = load_checkpoint(directory)
    if meta.get("kind") == TAMING_KIND:
        model: nn.Module = TamingVQGAN(TamingConfig.from_dict(meta["config"]))
        model.load_state_dict(state)
    else:
        model = load_vq(directory)  # checks kind and config itself
    return model.to(device).eval()


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] → float [B, 3, H, W] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] → uint8 [B, H, W, 3]."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
