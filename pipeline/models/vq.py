"""The pixel VQ tokenizer: a small conv autoencoder with an EMA vector quantiser (stage-2's target).

Images in [-1, 1] -> encoder -> [B, D, h, w] latents -> nearest codebook entry (l2, fp32) -> token ids
[B, h, w] -> codebook vectors -> decoder -> images. The codebook is not learned by gradient: it follows an
exponential moving average of the encoder outputs assigned to each code (VQ-VAE-2 style), and codes that
go unused for `restart_unused_steps` optimizer steps are re-initialised from encoder outputs of the
current batch. The encoder only gets the commitment term beta * ||z_e - sg(e)||^2 besides the
reconstruction loss (straight-through estimator).

Protocol with the shared loop (pipeline/train.py): `training_loss(batch)` computes the loss with the
codebook as it is and stashes the (detached) assignment statistics; `after_optimizer_step(step)` folds
them into the EMA and restarts dead codes. Keeping the codebook fixed within a step makes the step's
loss and its update see the same codebook; under DDP the statistics are all-reduced and restarts are
broadcast from rank 0, so every rank keeps the same codebook. Randomness (codebook init, restarts)
comes from a generator seeded by (cfg.seed, step), so a resumed run draws exactly what the
uninterrupted run drew.

Only L1/MSE + commitment losses: perceptual (LPIPS) and adversarial losses, which a real VQGAN uses for
sharp textures, need pretrained networks and GPU time we do not have here; for real-data quality load a
taming/MAGE VQGAN instead (pipeline/models/taming.py), which exposes the same encode/decode API.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from pipeline.checkpoint import load_checkpoint
from pipeline.sampling import derive_seed

CHECKPOINT_KIND = "vq"


@dataclass
class VQConfig:
    in_channels: int = 3
    # Defaults: 64x64 images -> 8x8 tokens (stem 4 x one 2x level); 500 steps of 16 synthetic images give
    # ~22.6 dB val PSNR (benchmarks/vq.py). The space-to-depth stem keeps every conv off the full
    # resolution, which is where a conv autoencoder spends most of its CPU time.
    channels: int = 64  # width of the first level; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2)  # levels; each level after the first halves the resolution
    stem: int = 4  # space-to-depth factor s: pixels are folded into s*s channels before the first conv
    num_res_blocks: int = 1  # ResNet blocks per level (encoder and decoder)
    norm_groups: int = 8  # GroupNorm groups; every level width must be divisible by it
    codebook_size: int = 512
    codebook_dim: int = 32
    beta: float = 0.25  # commitment weight
    ema_decay: float = 0.95
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    restart_unused_steps: int = 10  # dead-code threshold: restart codes unused this many steps (0 = never)
    rec_loss: str = "mse"  # "mse" | "l1"
    seed: int = 0  # weight init, codebook init and dead-code restarts

    def __post_init__(self) -> None:
        self.channel_mult = tuple(int(m) for m in self.channel_mult)  # JSON gives lists back
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ValueError(
                f"VQConfig.channel_mult must be a non-empty list of ints >= 1, got {self.channel_mult}"
            )
        for m in self.channel_mult:
            if (self.channels * m) % self.norm_groups:
                raise ValueError(
                    f"VQConfig: level width channels*mult = {self.channels}*{m} is not divisible by "
                    f"norm_groups={self.norm_groups}"
                )
        if self.stem < 1:
            raise ValueError(f"VQConfig.stem must be >= 1, got {self.stem}")
        if self.num_res_blocks < 0:
            raise ValueError(f"VQConfig.num_res_blocks must be >= 0, got {self.num_res_blocks}")
        if self.codebook_size < 2 or self.codebook_dim < 1:
            raise ValueError(
                f"VQConfig: need codebook_size >= 2 and codebook_dim >= 1, got {self.codebook_size}, "
                f"{self.codebook_dim}"
            )
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"VQConfig.ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.restart_unused_steps < 0:
            raise ValueError(f"VQConfig.restart_unused_steps must be >= 0, got {self.restart_unused_steps}")
        if self.rec_loss not in ("mse", "l1"):
            raise ValueError(f"VQConfig.rec_loss must be 'mse' or 'l1', got {self.rec_loss!r}")

    @property
    def downsample(self) -> int:
        return self.stem * 2 ** (len(self.channel_mult) - 1)


# ---------------------------------------------------------------------------------------------------------
# utilities


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Mean over the batch of per-image PSNR in dB; images in [-1, 1] have data_range 2."""
    if a.shape != b.shape:
        raise ValueError(f"psnr: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    # Clamp so that a perfect reconstruction gives a large finite number rather than inf.
    return (10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-10))).mean()


def codebook_usage(indices: torch.Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of codes used at least once, perplexity exp(H) of the code histogram)."""
    counts = torch.bincount(indices.flatten().long(), minlength=codebook_size).double()
    if counts.numel() > codebook_size:
        raise ValueError(f"codebook_usage: index {int(indices.max())} >= codebook_size {codebook_size}")
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), float(entropy.exp())


_VQ_STREAM = 0x5651  # keeps our seeds apart from the training loop's derive_seed(seed, step, rank)
_INIT, _RESTART = 1, 2


def _seed_for(seed: int, step: int, purpose: int) -> int:
    # A function of (seed, step, purpose) only: independent of rank, batch size and resumes.
    return derive_seed(seed, _VQ_STREAM, step, purpose)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------------------------------------------------
# encoder / decoder


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        # Space-to-depth first: the costliest convs of a conv autoencoder are the full-resolution ones.
        self.stem = nn.PixelUnshuffle(cfg.stem) if cfg.stem > 1 else nn.Identity()
        self.conv_in = nn.Conv2d(cfg.in_channels * cfg.stem**2, widths[0], 3, padding=1)
        layers: list[nn.Module] = []
        c = widths[0]
        for i, w in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, w, cfg.norm_groups))
                c = w
            if i < len(widths) - 1:
                layers.append(nn.Conv2d(c, c, 4, stride=2, padding=1))  # halve the resolution
        layers.append(ResBlock(c, c, cfg.norm_groups))
        self.layers = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c)
        self.conv_out = nn.Conv2d(c, cfg.codebook_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.conv_in(self.stem(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        widths = [cfg.channels * m for m in cfg.channel_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.codebook_dim, c, 3, padding=1)
        layers: list[nn.Module] = [ResBlock(c, c, cfg.norm_groups)]
        for i in reversed(range(len(widths))):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResBlock(c, widths[i], cfg.norm_groups))
                c = widths[i]
            if i > 0:
                # Nearest upsample + conv rather than a transposed conv: no checkerboard artefacts.
                layers.append(nn.Upsample(scale_factor=2.0, mode="nearest"))
                layers.append(nn.Conv2d(c, c, 3, padding=1))
        self.layers = nn.Sequential(*layers)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels * cfg.stem**2, 3, padding=1)
        self.unstem = nn.PixelShuffle(cfg.stem) if cfg.stem > 1 else nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.layers(self.conv_in(z))
        return self.unstem(self.conv_out(F.silu(self.norm_out(h))))


# ---------------------------------------------------------------------------------------------------------
# quantiser


class EMAQuantizer(nn.Module):
    """Nearest-neighbour codebook with EMA updates and dead-code restarts (all state in buffers)."""

    def __init__(
        self, codebook_size: int, dim: int, decay: float, eps: float, restart_unused_steps: int, seed: int
    ):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.decay, self.eps, self.restart_unused_steps, self.seed = decay, eps, restart_unused_steps, seed
        g = torch.Generator().manual_seed(_seed_for(seed, 0, _INIT))
        codebook = torch.randn(codebook_size, dim, generator=g)
        self.register_buffer("codebook", codebook)
        # EMA statistics. Starting each code with one pseudo-assignment at its own position keeps an unused
        # code where it is (instead of collapsing it to 0) until the restart logic replaces it.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.long))  # data-dependent init done?
        # Pending statistics of the current optimizer step (summed over micro-batches); not saved.
        self._pending_counts: torch.Tensor | None = None
        self._pending_sums: torch.Tensor | None = None
        self._pending_pool: list[torch.Tensor] = []
        self.last_restarted = 0  # codes restarted by the last update (logged with the next step)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes (squared l2, fp32) for z [N, D]."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            e = self.codebook.float()
            d = z.pow(2).sum(1, keepdim=True) - 2.0 * z @ e.t() + e.pow(2).sum(1)[None, :]
            return d.argmin(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """[B, h, w] ids -> [B, D, h, w] codebook vectors."""
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise ValueError(
                f"token ids must lie in [0, {self.codebook_size}), got range "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        return F.embedding(indices.long(), self.codebook).permute(0, 3, 1, 2).contiguous()

    def forward(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e [B, D, h, w] -> (straight-through z_q, commitment mse, indices [B, h, w])."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        idx = self.nearest(flat.detach())
        z_q = self.codebook[idx].view(b, h, w, d).permute(0, 3, 1, 2).to(z_e.dtype)
        commit = F.mse_loss(z_e.float(), z_q.float())
        if self.training and torch.is_grad_enabled():
            self._stash(flat.detach().float(), idx)
        return z_e + (z_q - z_e).detach(), commit, idx.view(b, h, w)

    def _stash(self, flat: torch.Tensor, idx: torch.Tensor) -> None:
        counts = torch.bincount(idx, minlength=self.codebook_size).float()
        sums = torch.zeros(self.codebook_size, self.dim, device=flat.device).index_add_(0, idx, flat)
        if self._pending_counts is None:
            self._pending_counts, self._pending_sums = counts, sums
        else:
            self._pending_counts += counts
            self._pending_sums += sums
        self._pending_pool.append(flat)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold this step's statistics into the EMA codebook and restart dead codes."""
        if self._pending_counts is None:
            return
        counts, sums = self._pending_counts, self._pending_sums
        pool = torch.cat(self._pending_pool)
        self._pending_counts, self._pending_sums, self._pending_pool = None, None, []
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)

        if int(self.initialized) == 0:
            # Data-dependent init: codes drawn from the first batch's encoder outputs, so every code starts
            # where the data is (random normal codes far from the data would mostly stay unused).
            every = torch.ones(self.codebook_size, dtype=torch.bool, device=self.codebook.device)
            self.last_restarted = self._restart(every, pool, step)
            self.initialized.fill_(1)
            return

        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])

        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        self.last_restarted = 0
        if self.restart_unused_steps > 0:
            dead = self.unused_steps >= self.restart_unused_steps
            if bool(dead.any()):
                self.last_restarted = self._restart(dead, pool, step)

    def _restart(self, mask: torch.Tensor, pool: torch.Tensor, step: int) -> int:
        """Re-initialise the codes in `mask` from random rows of `pool` (rank 0's pool under DDP)."""
        n_dead = int(mask.sum())
        g = torch.Generator().manual_seed(_seed_for(self.seed, step, _RESTART))
        # Without replacement when the pool is large enough, so restarted codes start apart.
        if pool.shape[0] >= n_dead:
            rows = torch.randperm(pool.shape[0], generator=g)[:n_dead]
        else:
            rows = torch.randint(pool.shape[0], (n_dead,), generator=g)
        new = pool[rows.to(pool.device)].to(self.codebook.dtype)
        if _distributed():
            dist.broadcast(new, src=0)
        self.codebook[mask] = new
        self.embed_sum[mask] = new
        self.cluster_size[mask] = 1.0
        self.unused_steps[mask] = 0
        return n_dead


# ---------------------------------------------------------------------------------------------------------
# model


class TokenGrid:
    """`token_shape` of the pixel tokenizers (VQModel here, TamingVQGAN): a grid of 1/`downsample` the image."""

    downsample: int

    def token_shape(self, height: int, width: int) -> tuple[int, int]:
        f = self.downsample
        if height % f or width % f:
            raise ValueError(f"image size {height}x{width} is not divisible by the downsample factor {f}")
        return height // f, width // f


class VQModel(TokenGrid, nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        # Build under a fixed seed without touching the caller's global RNG: same cfg, same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.encoder = Encoder(cfg)
            self.decoder = Decoder(cfg)
        self.quantizer = EMAQuantizer(
            cfg.codebook_size,
            cfg.codebook_dim,
            cfg.ema_decay,
            cfg.ema_eps,
            cfg.restart_unused_steps,
            cfg.seed,
        )

    # -- the tokenizer API shared with TamingVQGAN ---------------------------------------------------

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"expected images [B, {self.cfg.in_channels}, H, W] in [-1, 1], "
                f"got shape {tuple(images.shape)}"
            )
        self.token_shape(images.shape[2], images.shape[3])

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Continuous encoder output [B, D, h, w] (before quantisation), e.g. for stability metrics."""
        self._check_images(images)
        return self.encoder(images)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> token ids LongTensor [B, H/f, W/f]."""
        z = self.encode_latents(images)
        b, d, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)

    @torch.no_grad()
    def tokens_and_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, h*w] in raster order, pre-quantisation latents [B, h*w, D]): the `Tokenize` callable of
        pipeline.metrics.stability (cosine similarity is measured on the encoder output, before rounding)."""
        z = self.encode_latents(images)
        flat = z.flatten(2).transpose(1, 2)  # [B, h*w, D], raster order
        ids = self.quantizer.nearest(flat.reshape(-1, flat.shape[-1])).view(flat.shape[0], -1)
        return ids, flat.float()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images [B, C, h*f, w*f] clamped to [-1, 1]."""
        if indices.ndim != 3:
            raise ValueError(f"expected token ids [B, h, w], got shape {tuple(indices.shape)}")
        return self.decoder(self.quantizer.lookup(indices)).clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))

    # -- training protocol (pipeline/train.py) ---------------------------------------------------------

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Differentiable pass: (reconstruction, commitment mse, indices)."""
        z_e = self.encode_latents(images)
        z_q, commit, idx = self.quantizer(z_e)
        return self.decoder(z_q), commit, idx

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if "image" not in batch:
            raise KeyError(f"VQModel.training_loss: batch needs an 'image' entry, got keys {sorted(batch)}")
        x = batch["image"]
        rec, commit, idx = self(x)
        if self.cfg.rec_loss == "mse":
            rec_loss = F.mse_loss(rec.float(), x.float())
        else:
            rec_loss = F.l1_loss(rec.float(), x.float())
        loss = rec_loss + self.cfg.beta * commit
        with torch.no_grad():
            mse = F.mse_loss(rec.float().clamp(-1, 1), x.float())
            usage, perplexity = codebook_usage(idx, self.cfg.codebook_size)
            logs = {
                "rec": float(rec_loss),
                "commit": float(commit),
                "mse": float(mse),
                "psnr": 10.0 * math.log10(4.0 / max(float(mse), 1e-10)),
                "perplexity": perplexity,
                "usage": usage,
                "restarted": float(self.quantizer.last_restarted),
            }
        return loss, logs

    def after_optimizer_step(self, step: int) -> None:
        self.quantizer.update(step)


# ---------------------------------------------------------------------------------------------------------
# checkpoints


def vq_meta(cfg: VQConfig, **extra: Any) -> dict[str, Any]:
    """The `meta` to save with a VQModel checkpoint (pipeline.checkpoint / pipeline.train.fit)."""
    return {"kind": CHECKPOINT_KIND, "config": asdict(cfg), **extra}


def load_vq(directory: str | Path, map_location: str = "cpu") -> VQModel:
    """Load a VQModel saved by pipeline.checkpoint.save_checkpoint with meta from `vq_meta` (eval mode)."""
    state, meta, _ = load_checkpoint(directory, map_location=map_location)
    if meta.get("kind") != CHECKPOINT_KIND or not isinstance(meta.get("config"), dict):
        raise ValueError(
            f"{directory}: config.json has kind={meta.get('kind')!r}; expected kind {CHECKPOINT_KIND!r} "
            "with a 'config' dict (a checkpoint written with vq_meta)"
        )
    known = VQConfig.__dataclass_fields__
    unknown = sorted(set(meta["config"]) - set(known))
    if unknown:
        raise ValueError(f"{directory}/config.json: unknown VQConfig keys {unknown}")
    model = VQModel(VQConfig(**meta["config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory}/model.safetensors: missing keys {missing}, unexpected keys {unexpected}"
        )
    return model.eval()


__all__ = [
    "VQConfig",
    "VQModel",
    "EMAQuantizer",
    "psnr",
    "codebook_usage",
    "vq_meta",
    "load_vq",
]
