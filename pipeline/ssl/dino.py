"""DINO self-distillation (Caron et al. 2021) with an optional iBOT masked-patch loss (Zhou et al. 2022).

A student ViT + projection head learns to match, across augmented views, the sharpened and centred output
distribution of a teacher that is an exponential moving average (EMA) of the student. With the iBOT option,
some patches of the student's global crops are replaced by a learned mask token and each masked patch must
predict the teacher's distribution for that (unmasked) patch — training the patch features the DiGIT
tokenizer clusters, not only the CLS token.

`DINO` follows the shared training-loop protocol (pipeline/train.py): `training_loss(batch)` and
`after_optimizer_step(step)` (EMA teacher, centre update, collapse check).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.sampling import derive_seed
from pipeline.ssl.augment import multi_crop
from pipeline.ssl.config import SSLConfig
from pipeline.ssl.vit import build_vit
from pipeline.train import TrainingStopped, rank_world


def momentum_at(cfg: SSLConfig, step: int) -> float:
    """Teacher EMA momentum after 0-based `step`: cosine from momentum_start to 1 over cfg.steps."""
    progress = min(1.0, step / max(1, cfg.steps - 1))
    return 1.0 - (1.0 - cfg.momentum_start) * 0.5 * (1.0 + math.cos(math.pi * progress))


def teacher_temp_at(cfg: SSLConfig, step: int) -> float:
    """Teacher temperature: linear warm-up from warmup_teacher_temp to teacher_temp, then constant."""
    if step >= cfg.warmup_teacher_temp_steps:
        return cfg.teacher_temp
    t = step / cfg.warmup_teacher_temp_steps
    return cfg.warmup_teacher_temp + t * (cfg.teacher_temp - cfg.warmup_teacher_temp)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine similarity with L2-normalised prototypes.

    Normalising the prototype matrix is DINO's weight-normed last layer with its gain frozen at 1.
    """

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int, bn: bool = False
    ) -> None:
        super().__init__()

        def norm() -> nn.Module:
            return nn.BatchNorm1d(hidden_dim) if bn else nn.Identity()

        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=-1))


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator (DINOv2): -mean log distance of each L2-normalised row to its
    nearest other row. Minimising it pushes features apart — a direct remedy for feature collapse."""
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2.0)
        nearest = dots.argmax(dim=1)
    return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, iters: int = 3) -> torch.Tensor:
    """Teacher targets [N, K] balanced over the batch (DINOv2): rows are distributions, and every prototype
    gets about N/K of the mass, which rules out both collapses from the first step. Sums span all ranks."""
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    shift = logits.max()
    if distributed:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp((logits.float() - shift) / temp).T  # [K, N]
    k, n = q.shape[0], q.shape[1] * world

    def total(t: torch.Tensor) -> torch.Tensor:
        if distributed:
            dist.all_reduce(t)
        return t

    q /= total(q.sum())
    for _ in range(iters):
        q /= total(q.sum(dim=1, keepdim=True))  # each prototype: mass 1/K
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: mass 1/N
        q /= n
    return (q * n).T


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last dim."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim=-1)


class DINO(nn.Module):
    """Student + EMA teacher (backbone + head each), centres, and the step counter — all in the state dict,
    so a checkpoint of this module resumes exactly (augmentations are a function of (seed, step, rank))."""

    def __init__(self, cfg: SSLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.timm_kwargs = cfg.timm_kwargs()
        d = cfg.embed_dim
        # timm initialises from the global RNG: seed it for construction only.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.student_backbone = build_vit(self.timm_kwargs, cfg.stem, cfg.drop_path_rate)
            self.student_head = DINOHead(
                d, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_bn
            )
            if self.ibot:
                self.student_patch_head = DINOHead(
                    d, cfg.patch_out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_bn
                )
                self.mask_token = nn.Parameter(torch.zeros(d))
                nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.teacher_backbone = build_vit(self.timm_kwargs, cfg.stem)
        self.teacher_head = DINOHead(
            d, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_bn
        )
        if self.ibot:
            self.teacher_patch_head = DINOHead(
                d, cfg.patch_out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_bn
            )
        for s, t in self._pairs():
            t.load_state_dict(s.state_dict())
            t.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("patch_center", torch.zeros(1, cfg.patch_out_dim if self.ibot else 1))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

        self.global_views, self.local_view = cfg.view_augments()
        self._pending: dict[str, torch.Tensor] = {}
        self._indicators: dict[str, float] = {}
        self._bad_steps = 0

    @property
    def ibot(self) -> bool:
        return self.cfg.ibot_weight > 0

    @property
    def export_backbone(self) -> nn.Module:
        """The network `export_encoder` writes: the EMA teacher's backbone."""
        return self.teacher_backbone

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self.student_backbone, self.teacher_backbone), (self.student_head, self.teacher_head)]
        if self.ibot:
            pairs.append((self.student_patch_head, self.teacher_patch_head))
        return pairs

    def student_parameters(self) -> list[nn.Parameter]:
        """Student parameters in the same order as `teacher_parameters()` (mask token excluded)."""
        return [p for s, _ in self._pairs() for p in s.parameters()]

    def teacher_parameters(self) -> list[nn.Parameter]:
        return [p for _, t in self._pairs() for p in t.parameters()]

    def _encode(self, vit: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens [B, prefix + T, D] through the final norm; masked patches get the mask token."""
        h = vit.patch_embed(x)  # [B, gh, gw, D]: dynamic_img_size keeps the grid for _pos_embed
        if mask is not None:
            h = torch.where(mask.unsqueeze(-1), self.mask_token.to(h.dtype), h)
        h = vit._pos_embed(h)
        h = vit.patch_drop(h)
        h = vit.norm_pre(h)
        h = vit.blocks(h)
        return vit.norm(h)

    def _random_masks(self, n: int, grid: int, g: torch.Generator) -> torch.Tensor:
        """[n, grid, grid] bool: a mask_prob share of crops get a uniformly drawn share of patches masked."""
        cfg, t = self.cfg, grid * grid
        on = torch.rand(n, generator=g) < cfg.mask_prob
        ratio = cfg.mask_ratio[0] + (cfg.mask_ratio[1] - cfg.mask_ratio[0]) * torch.rand(n, generator=g)
        count = torch.where(on, (ratio * t).round(), torch.zeros(n))
        rank = torch.rand(n, t, generator=g).argsort(dim=1).argsort(dim=1)  # a random permutation per crop
        return (rank < count[:, None]).view(n, grid, grid)

    def _teacher_targets(self, logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        if self.cfg.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp, self.cfg.sinkhorn_iters)
        return F.softmax((logits - center) / temp, dim=-1)

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        if "image" not in batch:
            raise KeyError(f"DINO.training_loss: batch needs key 'image' ([B, 3, H, W]); got {sorted(batch)}")
        x = batch["image"]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"DINO.training_loss: batch['image'] must be [B, 3, H, W], got {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        step = int(self.step)
        rank, _ = rank_world()
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, step, rank))
        glob, loc = multi_crop(x, self.global_views, self.local_view, cfg.local_crops, g)
        mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
        glob = (glob - mean) / std
        loc = (loc - mean) / std if loc is not None else None
        grid = glob.shape[-1] // cfg.patch_size
        masks = self._random_masks(glob.shape[0], grid, g).to(x.device) if self.ibot else None
        prefix = self.student_backbone.num_prefix_tokens

        temp = teacher_temp_at(cfg, step)
        with torch.no_grad():
            t_tokens = self._encode(self.teacher_backbone, glob)
            t_logits = self.teacher_head(t_tokens[:, 0]).float()
            t_prob = self._teacher_targets(t_logits, self.center, temp)

        s_tokens = self._encode(self.student_backbone, glob, masks)
        s_logits = [self.student_head(s_tokens[:, 0])]
        if loc is not None:
            s_logits.append(self.student_head(self._encode(self.student_backbone, loc)[:, 0]))
        s_logp = F.log_softmax(torch.cat(s_logits).float() / cfg.student_temp, dim=-1)

        # Cross-view distillation: each teacher (global) view teaches every other student view.
        t_views, s_views = t_prob.chunk(2), s_logp.chunk(2 + cfg.local_crops)
        terms = [
            -(t * s).sum(dim=-1).mean()
            for i, t in enumerate(t_views)
            for v, s in enumerate(s_views)
            if v != i
        ]
        dino_loss = torch.stack(terms).mean()
        loss = dino_loss
        logs: dict[str, float] = {"dino_loss": float(dino_loss.detach())}
        if cfg.koleo_weight > 0:
            koleo = torch.stack([koleo_loss(c) for c in s_tokens[:, 0].chunk(2)]).mean()
            loss = loss + cfg.koleo_weight * koleo
            logs["koleo_loss"] = float(koleo.detach())

        if self.ibot:
            with torch.no_grad():
                tp_logits = self.teacher_patch_head(t_tokens[:, prefix:]).float()  # [2B, T, Kp]
                tp_prob = self._teacher_targets(tp_logits.flatten(0, 1), self.patch_center, temp)
                tp_prob = tp_prob.view_as(tp_logits)
            flat = masks.flatten(1)  # [2B, T]
            sp_logp = F.log_softmax(
                self.student_patch_head(s_tokens[:, prefix:][flat]).float() / cfg.student_temp, -1
            )
            per_patch = -(tp_prob[flat] * sp_logp).sum(dim=-1)
            # iBOT's averaging: mean over each crop's masked patches, then over all crops (unmasked count 0).
            crop = torch.arange(flat.shape[0], device=x.device).unsqueeze(1).expand_as(flat)[flat]
            per_crop = torch.zeros(flat.shape[0], device=x.device).index_add(0, crop, per_patch)
            ibot_loss = (per_crop / flat.sum(dim=1).clamp(min=1)).mean()
            loss = loss + cfg.ibot_weight * ibot_loss
            logs["ibot_loss"] = float(ibot_loss.detach())
            self._pending["patch_center"] = tp_logits.mean(dim=(0, 1)).unsqueeze(0)

        with torch.no_grad():
            self._pending["center"] = t_logits.mean(dim=0, keepdim=True)
            log_k = math.log(cfg.out_dim)
            h_t = entropy(t_prob)
            feats = F.normalize(s_tokens[:, 0].detach().float(), dim=-1)
            self._indicators = {
                "teacher_entropy": float(h_t.mean()) / log_k,
                "teacher_batch_entropy": float(entropy(t_prob.mean(dim=0))) / log_k,
                # each teacher view meets the same number of student views, so CE - H(teacher) is the KL
                "kl_teacher_student": float(dino_loss.detach()) - float(h_t.mean()),
                "center_entropy": float(entropy(F.softmax(self.center.float() / temp, dim=-1)).mean())
                / log_k,
                "feature_std": float(feats.std(dim=0).mean()) * math.sqrt(feats.shape[1]),
            }
        logs |= self._indicators | {"teacher_temp": temp}
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """EMA teacher update, centre update, step counter, collapse check (raises TrainingStopped)."""
        cfg = self.cfg
        m = momentum_at(cfg, step)
        teacher, student = self.teacher_parameters(), self.student_parameters()
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, [p.detach() for p in student], alpha=1.0 - m)
        for name in ("center", "patch_center"):
            if name in self._pending:
                batch_center = self._pending.pop(name)
                if dist.is_available() and dist.is_initialized():
                    dist.all_reduce(batch_center)
                    batch_center /= dist.get_world_size()
                buf = getattr(self, name)
                buf.mul_(cfg.center_momentum).add_(batch_center, alpha=1.0 - cfg.center_momentum)
        self.step.fill_(step + 1)
        self._check_collapse(step)

    def collapse_reasons(self) -> list[str]:
        """Indicators of the last training_loss that are past their thresholds, as 'name=value (...)'."""
        cfg, ind = self.cfg, self._indicators
        if not ind:
            return []
        reasons = []
        if ind["feature_std"] < cfg.min_feature_std:
            reasons.append(f"feature_std={ind['feature_std']:.4f} (< min_feature_std {cfg.min_feature_std})")
        if ind["teacher_batch_entropy"] < cfg.min_batch_entropy:
            reasons.append(
                f"teacher_batch_entropy={ind['teacher_batch_entropy']:.4f} (< min_batch_entropy "
                f"{cfg.min_batch_entropy}: every image maps to the same prototype)"
            )
        if ind["teacher_entropy"] > cfg.max_teacher_entropy:
            reasons.append(
                f"teacher_entropy={ind['teacher_entropy']:.4f} (> max_teacher_entropy "
                f"{cfg.max_teacher_entropy}: teacher outputs are uniform)"
            )
        return reasons

    def _check_collapse(self, step: int) -> None:
        reasons = self.collapse_reasons() if step >= self.cfg.collapse_warmup_steps else []
        self._bad_steps = self._bad_steps + 1 if reasons else 0
        if self._bad_steps >= self.cfg.collapse_patience:
            raise TrainingStopped(
                f"SSL pretraining collapsed: {'; '.join(reasons)} at step {step}, for "
                f"{self._bad_steps} consecutive steps. Try a lower lr, a higher teacher momentum "
                "(momentum_start), or check the centring (center_momentum < 1) and teacher temperature."
            )
