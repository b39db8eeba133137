"""Latent-space stability (paper Table 1): how much does a tokenizer's output move under pixel noise?

For each SNR (dB) we add Gaussian noise with per-image variance sigma^2 = mean(x^2) / 10^(SNR/10), re-tokenize
and measure
  change_rate  share of token positions whose id changed (clean vs noisy), over all positions of all images;
  cosine       mean over positions of the cosine similarity between clean and noisy latents.

Domain. The noise is added to `images` exactly as given, and the SNR is measured there. In this project we pass
images in [-1, 1] (the shared float domain) and each tokenizer's `tokenize` applies its own normalisation (e.g.
ImageNet mean/std for the SSL encoder), so two tokenizers are compared under *identical* pixel noise. The
paper's code adds the noise to the encoder's normalised input instead; pass normalised images to reproduce that.
Noisy images are not clipped (clipping would change the SNR).

Noise. Image i gets one standard-normal pattern from a generator seeded by (seed, i), scaled per SNR (common
random numbers: the curve over SNR is smooth, and the table does not depend on the batch size).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

PAPER_SNRS_DB = (30, 25, 20, 15, 10, 5, 1)

Tokenize = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def noise_std_for_snr(images: torch.Tensor, snr_db: float) -> torch.Tensor:
    """Per-image noise std [B] giving `snr_db` for images [B, ...]: sigma^2 = mean(x^2) / 10^(snr/10)."""
    power = images.double().pow(2).flatten(1).mean(dim=1)
    return (power / 10.0 ** (snr_db / 10.0)).sqrt().to(images.dtype)


def add_noise_at_snr(images: torch.Tensor, snr_db: float, noise: torch.Tensor) -> torch.Tensor:
    """images + sigma_i * noise, with sigma_i from `noise_std_for_snr`; `noise` is standard normal, same shape."""
    if noise.shape != images.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != images shape {tuple(images.shape)}")
    std = noise_std_for_snr(images, snr_db)
    return images + std.view(-1, *([1] * (images.dim() - 1))) * noise


def measured_snr_db(clean: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
    """Per-image SNR in dB actually realised: 10 log10(mean(x^2) / mean((noisy - x)^2))."""
    signal = clean.double().pow(2).flatten(1).mean(dim=1)
    noise = (noisy.double() - clean.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(signal / noise)


def image_noise(shape: Sequence[int], seed: int, index: int) -> torch.Tensor:
    """The standard-normal noise pattern of image `index`: a function of (seed, index) only."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(tuple(shape), generator=gen)


def _check_outputs(tokens: torch.Tensor, latents: torch.Tensor, batch: int) -> None:
    if tokens.shape[0] != batch or tokens.is_floating_point():
        raise ValueError(
            f"tokenize must return integer tokens [B={batch}, ...], got {tokens.dtype} {tuple(tokens.shape)}"
        )
    if latents.dim() != 3 or latents.shape[0] != batch or not latents.is_floating_point():
        raise ValueError(
            f"tokenize must return float latents [B={batch}, T, D], got {latents.dtype} "
            f"{tuple(latents.shape)}"
        )


@torch.no_grad()
def stability_table(
    tokenize: Tokenize,
    images: torch.Tensor,
    snrs_db: Sequence[float] = PAPER_SNRS_DB,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Table 1 for one tokenizer.

    tokenize: float images [B, 3, H, W] -> (integer tokens [B, ...], float latents [B, T, D]).
    images:   float [N, 3, H, W] in the domain described in the module docstring.
    Returns one row per SNR: {snr_db, change_rate, cosine, measured_snr_db} (the last: mean realised SNR).
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images: expected float [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if len(images) == 0:
        raise ValueError("images: empty; need at least one image")
    if not snrs_db:
        raise ValueError("snrs_db is empty")
    n_snr = len(snrs_db)
    changed = torch.zeros(n_snr, dtype=torch.float64)
    positions = torch.zeros(n_snr, dtype=torch.float64)
    cos_sum = torch.zeros(n_snr, dtype=torch.float64)
    cos_count = torch.zeros(n_snr, dtype=torch.float64)
    snr_sum = torch.zeros(n_snr, dtype=torch.float64)

    batches = range(0, len(images), batch_size)
    for start in tqdm(batches, desc="stability", unit="batch", disable=not progress):
        clean = images[start : start + batch_size]
        b = clean.shape[0]
        noise = torch.stack([image_noise(clean.shape[1:], seed, start + j) for j in range(b)]).to(clean)
        tokens, latents = tokenize(clean)
        _check_outputs(tokens, latents, b)
        for k, snr in enumerate(snrs_db):
            noisy = add_noise_at_snr(clean, float(snr), noise)
            noisy_tokens, noisy_latents = tokenize(noisy)
            _check_outputs(noisy_tokens, noisy_latents, b)
            if noisy_tokens.shape != tokens.shape or noisy_latents.shape != latents.shape:
                raise ValueError("tokenize returned different shapes for clean and noisy images")
            changed[k] += (noisy_tokens != tokens).sum().item()
            positions[k] += tokens.numel()
            cos = F.cosine_similarity(latents.double(), noisy_latents.double(), dim=-1)
            cos_sum[k] += cos.sum().item()
            cos_count[k] += cos.numel()
            snr_sum[k] += measured_snr_db(clean, noisy).sum().item()

    return [
        {
            "snr_db": float(snr),
            "change_rate": (changed[k] / positions[k]).item(),
            "cosine": (cos_sum[k] / cos_count[k]).item(),
            "measured_snr_db": (snr_sum[k] / len(images)).item(),
        }
        for k, snr in enumerate(snrs_db)
    ]


def snr_key(snr_db: float) -> str:
    """Metric-key form of an SNR: 30.0 -> "30db", 2.5 -> "2p5db" (metric keys carry no dots)."""
    return f"{snr_db:g}".replace(".", "p").replace("-", "m") + "db"
