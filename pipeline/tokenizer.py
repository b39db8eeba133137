"""The DiGIT tokenizer as one object: encoder (from params) + K-Means centroids → token grids.

Used by the stages (extract/tokenize), the stability metric and `digit inspect`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch

from pipeline.assign import assign
from pipeline.config import Base
from pipeline.config import Encoder as EncoderParams
from pipeline.encoders import Encoder, build_encoder


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(device)


@functools.lru_cache(maxsize=4)
def _cached_encoder(enc_json: str, image_size: int, device: str) -> Encoder:
    p = EncoderParams.model_validate_json(enc_json)
    enc = build_encoder(
        source=p.source,
        name=p.name,
        weights=p.weights,
        layer=p.layer,
        img_size=p.img_size or image_size,
        mean=p.mean,
        std=p.std,
        seed=p.seed,
    )
    enc.model.eval()
    return enc.to(device)


def encoder_from_params(enc: EncoderParams, base: Base) -> Encoder:
    """Build (once per process) the encoder that params describe, in eval mode on base.device."""
    return _cached_encoder(enc.model_dump_json(), base.image_size, str(resolve_device(base.device)))


class DigitTokenizer:
    """images (uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1]) → (tokens [B, h, w], latents [B, T, D])."""

    def __init__(self, encoder: Encoder, centroids: np.ndarray | torch.Tensor):
        centroids = np.asarray(centroids, dtype=np.float32)
        if centroids.ndim != 2 or centroids.shape[1] != encoder.dim:
            raise ValueError(
                f"centroids have shape {centroids.shape}; the encoder gives D={encoder.dim}, "
                f"so expected [K, {encoder.dim}]"
            )
        self.encoder = encoder
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids)).to(encoder.device)

    @property
    def grid(self) -> tuple[int, int]:
        return self.encoder.grid

    def __call__(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder.patch_features(images)
        tokens = assign(feats, self.centroids)
        return tokens.reshape(feats.shape[0], *self.grid), feats


def load_centroids(kmeans_dir: str | Path) -> tuple[np.ndarray, dict]:
    kmeans_dir = Path(kmeans_dir)
    path = kmeans_dir / "centroids.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (run the kmeans stage first)")
    centroids = np.load(path, allow_pickle=False)
    meta_path = kmeans_dir / "kmeans.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return centroids, meta
