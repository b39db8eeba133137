"""DINO's multi-crop augmentation as batched torch ops, every random draw from one torch.Generator.

Per view: random resized crop + horizontal flip (+ optional rotation; one affine resampling), colour jitter,
random grayscale, Gaussian blur, solarisation — the recipe of DINO (Caron et al. 2021), with the colour-jitter
ops in a fixed order (brightness, contrast, saturation, hue) rather than a random one — and optional Gaussian
pixel noise. Images are float [B, 3, H, W] in [0, 1]; outputs stay in [0, 1] except with noise, which is not
clipped (normalisation is the caller's). Same generator state => same crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


@dataclass(frozen=True)
class ViewAugment:
    """How one kind of view is made (DINO: global view 1, global view 2, local views differ in blur/solarise)."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    flip_p: float = 0.5
    rotate: float = 0.0  # max crop rotation in degrees (0: axis-aligned boxes)
    noise_p: float = 0.0  # share of views that get Gaussian pixel noise
    noise_snr_db: tuple[float, float] = (5.0, 30.0)  # its SNR range (uniform in dB)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _coin(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def crop_thetas(
    n: int,
    scale: tuple[float, float],
    flip_p: float,
    g: torch.Generator,
    rotate: float = 0.0,
) -> torch.Tensor:
    """Random crop boxes as `affine_grid` matrices [n, 2, 3]: output (u, v) in [-1, 1]² samples the image at
    theta @ (u, v, 1), in the same normalised coordinates (align_corners=False).

    Area fraction in `scale`, aspect ratio in [3/4, 4/3], an optional rotation by up to ±`rotate` degrees,
    and a horizontal flip with probability flip_p. Boxes too wide for the image are clamped to it rather than
    re-drawn (torchvision retries 10 times); a rotated box's corners may leave the image (reflected there).
    The matrices are what the dense loss maps patch grids with (`pipeline/ssl/joint.py:match_views`).
    """
    area = _uniform(n, scale[0], scale[1], g)
    log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), g)
    ratio = log_ratio.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # box width / image width
    h = (area / ratio).sqrt().clamp(max=1.0)
    if rotate > 0:
        # drawn only when asked for, so rotate=0 keeps the random stream of the unrotated recipe
        angle = _uniform(n, -math.radians(rotate), math.radians(rotate), g)
        cos, sin = angle.cos(), angle.sin()
    else:
        cos, sin = torch.ones(n), torch.zeros(n)
    # half-extent of the (rotated) box along x and y: centres keep it inside the image where it fits
    ex = (w * cos).abs() + (h * sin).abs()
    ey = (w * sin).abs() + (h * cos).abs()
    cx = (2 * torch.rand(n, generator=g) - 1) * (1 - ex).clamp(min=0)
    cy = (2 * torch.rand(n, generator=g) - 1) * (1 - ey).clamp(min=0)
    flip = torch.where(_coin(n, flip_p, g), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    # theta[:, :, :2] = R(angle) @ diag(w * flip, h): flip and scale the box, then rotate it
    theta[:, 0, 0] = cos * w * flip
    theta[:, 0, 1] = -sin * h
    theta[:, 1, 0] = sin * w * flip
    theta[:, 1, 1] = cos * h
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def apply_crop(x: torch.Tensor, theta: torch.Tensor, size: int) -> torch.Tensor:
    """Resample images [B, C, H, W] through crop matrices [B, 2, 3] (`crop_thetas`) to [B, C, size, size]."""
    grid = F.affine_grid(theta.to(x), [x.shape[0], x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    flip_p: float,
    g: torch.Generator,
    rotate: float = 0.0,
) -> torch.Tensor:
    """Crop a random box (`crop_thetas`) of each image and resize it to size²."""
    return apply_crop(x, crop_thetas(x.shape[0], scale, flip_p, g, rotate), size)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _per_image(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x).view(-1, 1, 1, 1)


def color_jitter(x: torch.Tensor, a: ViewAugment, g: torch.Generator) -> torch.Tensor:
    """torchvision-style ColorJitter applied to a random subset (prob a.jitter_p) of the images."""
    n = x.shape[0]
    on = _coin(n, a.jitter_p, g).float()
    # A factor of exactly 1 (or hue 0) is the identity: images not jittered get those.
    b = 1 + on * _uniform(n, -a.brightness, a.brightness, g)
    c = 1 + on * _uniform(n, -a.contrast, a.contrast, g)
    s = 1 + on * _uniform(n, -a.saturation, a.saturation, g)
    hue = on * _uniform(n, -a.hue, a.hue, g)
    x = (x * _per_image(b, x)).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * _per_image(c, x) + mean).clamp(0, 1)
    gray = _gray(x)
    x = ((x - gray) * _per_image(s, x) + gray).clamp(0, 1)
    # Hue shift as a rotation of the chroma plane in YIQ space: linear, so one 3x3 matrix per image.
    angle = 2 * math.pi * hue
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = angle.cos(), -angle.sin()
    rot[:, 2, 1], rot[:, 2, 2] = angle.sin(), angle.cos()
    m = torch.linalg.inv(_RGB_TO_YIQ) @ rot @ _RGB_TO_YIQ
    return torch.einsum("nij,njhw->nihw", m.to(x), x).clamp(0, 1)


def random_grayscale(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    on = _per_image(_coin(x.shape[0], p, g).float(), x)
    return on * _gray(x).expand_as(x) + (1 - on) * x


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur with a per-image sigma; images not chosen (prob 1-p) get a delta kernel."""
    n, ch, hgt, wid = x.shape
    on = _coin(n, p, g)
    sig = _uniform(n, sigma[0], sigma[1], g)
    radius = min(math.ceil(3 * sigma[1]), (min(hgt, wid) - 1) // 2)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(offsets[None] ** 2) / (2 * sig[:, None] ** 2))
    kernel = torch.where(on[:, None], kernel, (offsets == 0).float()[None])
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(x)
    k = kernel.repeat_interleave(ch, dim=0)  # one kernel per (image, channel) for a grouped conv
    y = F.pad(x.reshape(1, n * ch, hgt, wid), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(n * ch, 1, -1, 1), groups=n * ch)
    y = F.conv2d(y, k.view(n * ch, 1, 1, -1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def solarize(x: torch.Tensor, p: float, g: torch.Generator) -> torch.Tensor:
    on = _per_image(_coin(x.shape[0], p, g).float(), x)
    return on * torch.where(x >= 0.5, 1 - x, x) + (1 - on) * x


def gaussian_noise(
    x: torch.Tensor, p: float, snr_db: tuple[float, float], g: torch.Generator
) -> torch.Tensor:
    """Additive Gaussian noise on a random subset (prob p) of the images, at a per-image SNR drawn uniformly
    in dB from `snr_db` — measured as the stability metric does (pipeline/metrics/stability.py): on the
    image in [-1, 1], sigma^2 = mean(x^2) / 10^(SNR/10). Not clipped, like the metric's noisy images."""
    if p <= 0:
        return x  # draws nothing, so p = 0 keeps the random stream of a recipe without noise
    n = x.shape[0]
    on = _coin(n, p, g).float()
    snr = _uniform(n, snr_db[0], snr_db[1], g)
    noise = torch.randn(x.shape, generator=g).to(x)
    power = (2 * x - 1).pow(2).flatten(1).mean(dim=1)
    sigma = (power / 10 ** (snr.to(x) / 10)).sqrt() * on.to(x)
    return x + _per_image(sigma / 2, x) * noise  # sigma is in [-1, 1] units: half of it in [0, 1]


def augment_view(
    x: torch.Tensor, a: ViewAugment, g: torch.Generator, with_theta: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One augmented view of every image: [B, 3, H, W] in [0, 1] -> [B, 3, a.size, a.size] in [0, 1]
    (and, with_theta, its crop matrices [B, 2, 3], see `crop_thetas`)."""
    theta = crop_thetas(x.shape[0], a.scale, a.flip_p, g, a.rotate)
    x = apply_crop(x, theta, a.size)
    x = color_jitter(x, a, g)
    x = random_grayscale(x, a.grayscale_p, g)
    x = gaussian_blur(x, a.blur_p, a.blur_sigma, g)
    x = solarize(x, a.solarize_p, g)
    x = gaussian_noise(x, a.noise_p, a.noise_snr_db, g)
    return (x, theta) if with_theta else x


def multi_crop(
    x: torch.Tensor,
    global_views: tuple[ViewAugment, ViewAugment],
    local_view: ViewAugment,
    n_local: int,
    g: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(global crops [2B, 3, G, G], local crops [n_local*B, 3, L, L] or None), view-major (view 0's B first)."""
    globals_ = torch.cat([augment_view(x, a, g) for a in global_views])
    locals_ = torch.cat([augment_view(x, local_view, g) for _ in range(n_local)]) if n_local > 0 else None
    return globals_, locals_
