"""The DiGIT tokenizer as one object: encoder (from params) + K-Means centroids → token grids, and the
fused on-device tokenization of image views (DiGIT and pixel-VQ tokens of the same pixels).

Used by the stages (extract/tokenize), the stability metric and `digit inspect`. Models are built once per
process (functools caches keyed on params, paths and content hashes), which is what lets per-shard jobs be
plain module-level functions that a process-based task runner can pickle. The stability adapters at the end
take float images in [-1, 1] (the shared domain, where the noise is added), so the DiGIT and the VQ tokenizer
see *identical* noisy pixels.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.assign import assign
from pipeline.config import Base
from pipeline.config import Encoder as EncoderParams
from pipeline.encoders import Encoder, build_encoder


def resolve_device(device: str) -> torch.device:
    """base.device → a torch device; under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    if device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
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


def encoder_from_params(enc: EncoderParams, base: Base, weights_sha256: str | None = None) -> Encoder:
    """Build (once per process) the encoder that params describe, in eval mode on base.device.

    With `weights_sha256`, a cached encoder whose weights hash differs (the file changed since it was
    built, in a long-lived worker process) is rebuilt; a mismatch after that is an error.
    """
    args = (enc.model_dump_json(), base.image_size, str(resolve_device(base.device)))
    encoder = _cached_encoder(*args)
    if weights_sha256 is not None and encoder.weights_sha256 != weights_sha256:
        _cached_encoder.cache_clear()
        encoder = _cached_encoder(*args)
        if encoder.weights_sha256 != weights_sha256:
            raise RuntimeError(
                f"encoder weights {encoder.weights}: sha256 {encoder.weights_sha256[:12]}… changed during the "
                f"run (expected {weights_sha256[:12]}…)"
            )
    return encoder


class DigitTokenizer:
    """images (uint8 [B, H, W, 3] or float [B, 3, H, W] in [0, 1]) → (tokens [B, h, w], latents [B, T, D])."""

    def __init__(self, encoder: Encoder, centroids: np.ndarray | torch.Tensor):
        if not torch.is_tensor(centroids):
            centroids = torch.from_numpy(np.ascontiguousarray(np.asarray(centroids, dtype=np.float32)))
        if centroids.ndim != 2 or centroids.shape[1] != encoder.dim:
            raise ValueError(
                f"centroids have shape {tuple(centroids.shape)}; the encoder gives D={encoder.dim}, "
                f"so expected [K, {encoder.dim}]"
            )
        self.encoder = encoder
        self.centroids = centroids.to(device=encoder.device, dtype=torch.float32)

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


@functools.lru_cache(maxsize=2)
def _cached_centroids(path: str, sha256: str, device: str) -> torch.Tensor:
    from pipeline.io import sha256_file

    centroids = np.load(path, allow_pickle=False)
    if sha256_file(path) != sha256:
        raise RuntimeError(f"{path}: changed during the run (sha256 differs from the one checked at start)")
    return torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)


def centroids_on(path: str | Path, sha256: str, device: torch.device) -> torch.Tensor:
    """float32 [K, D] centroids of `path` on `device`, loaded once per process (keyed on the file hash)."""
    return _cached_centroids(str(path), sha256, str(device))


@functools.lru_cache(maxsize=2)
def _cached_pixel_vq(directory: str, sha256: str, device: str) -> nn.Module:
    from pipeline.checkpoint import checkpoint_sha256
    from pipeline.pixel_vq import load_pixel_vq

    model = load_pixel_vq(directory, device)
    if checkpoint_sha256(directory) != sha256:
        raise RuntimeError(
            f"{directory}: changed during the run (sha256 differs from the one checked at start)"
        )
    return model


def pixel_vq_on(directory: str | Path, sha256: str, device: torch.device) -> nn.Module:
    """The pixel VQ model of `directory` in eval mode on `device`, loaded once per process."""
    return _cached_pixel_vq(str(directory), sha256, str(device))


def vq_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] → float [B, 3, H, W] in [-1, 1] on the images' device; the arithmetic of
    pipeline.pixel_vq.to_model_range, so the values are the same bits."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


@torch.inference_mode()
def tokenize_views(
    tokenizer: DigitTokenizer, vq: nn.Module, views: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 views [V, B, H, W, 3] (view-major, as `features.view_loader` batches them) → (DiGIT ids int64
    [B, V, h, w], pixel-VQ ids int64 [B, V, h', w']), both on the tokenizer's device, from the same pixels
    of each view.

    Fused: the encoder's fp32 features stay on the device and go straight to the exact nearest-centroid
    assignment. Each view is its own forward over the B images, so view v's tokens do not depend on how
    many views are made (view 0 of V = 4 is bit for bit the V = 1 token grid).
    """
    device = tokenizer.encoder.device
    digit, pixel = [], []
    for x in views:
        x = x.to(device, non_blocking=True)
        digit.append(tokenizer(x)[0])
        pixel.append(vq.encode(vq_input(x)))
    return torch.stack(digit, dim=1), torch.stack(pixel, dim=1)


# --- stability tokenizer adapters ----------------------------------------------------------------------


def encoder_input(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """Float images [B, 3, H, W] in [-1, 1] (noisy ones may lie outside) -> the encoder's normalised input.

    The same mapping as Encoder.preprocess for images in range — x/2 + 1/2 into [0, 1], bicubic resize to
    the encoder's size, the encoder's mean/std — but without preprocess' range check and clamping: clamping
    the noisy pixels would shrink the noise the DiGIT encoder sees (heavily at low SNR) while the VQ encoder
    gets it unclamped, biasing the comparison in DiGIT's favour."""
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"expected float images [B, 3, H, W] in [-1, 1], got {images.dtype} {tuple(images.shape)}"
        )
    x = (images.to(encoder.device, torch.float32) + 1.0) / 2.0
    size = encoder.img_size
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True)
    mean = torch.tensor(encoder.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class DigitStabilityTokenizer(DigitTokenizer):
    """The DiGIT tokenizer as a pipeline.metrics.stability `Tokenize`: images [-1, 1], unclamped (see
    `encoder_input`) -> (tokens [B, T], patch features [B, T, D]), both on the CPU."""

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder.features_of_input(encoder_input(self.encoder, images))
        return assign(feats, self.centroids).cpu(), feats.cpu()


def vq_stability_tokenizer(vq: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The pixel VQ tokenizer (ours or an imported VQGAN) as a `Tokenize`: images [-1, 1] -> (ids [B, h*w],
    pre-quantisation latents [B, h*w, D]); the cosine is measured before rounding to the codebook."""
    device = next(vq.parameters()).device

    @torch.inference_mode()
    def tokenize(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ids, latents = vq.tokens_and_latents(images.to(device, torch.float32))
        return ids.cpu(), latents.cpu()

    return tokenize
