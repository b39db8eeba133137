"""Joint-embedding SSL: VICReg (Bardes et al. 2022) or SimCLR (Chen et al. 2020) on a ViT's pooled patch
tokens, with an optional dense term on the patch tokens the DiGIT tokenizer clusters.

Every image gives two global crops (and `local_crops` smaller ones). One backbone embeds all of them; the
patch tokens of block `pool_layer` (through the final norm) are mean-pooled and projected by an MLP:
  vicreg   invariance (MSE) between the projections of every pair of views that includes a global one, plus
           per view a variance hinge (std of each dimension >= 1) and a covariance penalty (off-diagonal
           covariances -> 0), weighted sim_weight / var_weight / cov_weight;
  simclr   NT-Xent at `temperature`, multi-positive: each projection's positives are the other views of
           its image, its negatives every view of the other images.
The dense term (dense_weight > 0) reads block `dense_layer` (default -3: the tokenizer's features). The
crop matrices of both views are known (augment.crop_thetas), so each patch centre of one view is mapped to
image coordinates and on into the other view's patch grid (`match_views`); where it lands inside that view,
the other view's projected patch map is sampled there bilinearly (`sample_patch_grid`, an RoI-align of one
point) and VICReg's invariance term pulls the two together, with its variance and covariance terms on the
projected patches of each view — VICRegL's location-based matching, without its feature-space matching.

There is no teacher: the exported encoder is the trained backbone itself. Everything random is drawn from
a generator seeded by (seed, step, rank), and the step is a buffer of the module, so a resumed run is exact.
Under DDP the global projections are gathered from every rank before the loss (differentiably, as in
VICReg's code), so the global term sees the global batch; the dense term and BatchNorm statistics are
per rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pipeline.metrics.knn import block_index
from pipeline.sampling import derive_seed
from pipeline.ssl.augment import ViewAugment, augment_view
from pipeline.ssl.config import SSLConfig
from pipeline.ssl.vit import build_vit
from pipeline.train import TrainingStopped, rank_world


class Projector(nn.Module):
    """VICReg's expander: `layers` linear layers, each but the last followed by (BatchNorm and) ReLU."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int, bn: bool = True) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden_dim), nn.BatchNorm1d(hidden_dim) if bn else nn.Identity(), nn.ReLU()]
            d = hidden_dim
        mods.append(nn.Linear(d, out_dim))
        self.mlp = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


# --- losses ---------------------------------------------------------------------------------------------


def variance_loss(z: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """VICReg's variance hinge: mean over dimensions of relu(1 - std), std over the rows of z [N, E]."""
    std = (z.float().var(dim=0) + eps).sqrt()
    return F.relu(1.0 - std).mean()


def covariance_loss(z: torch.Tensor) -> torch.Tensor:
    """VICReg's covariance term: sum of squared off-diagonal covariances of z [N, E], divided by E."""
    z = z.float()
    n, e = z.shape
    zc = z - z.mean(dim=0)
    cov = zc.T @ zc / max(1, n - 1)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.pow(2).sum() / e


def nt_xent(z: torch.Tensor, n_views: int, temperature: float) -> tuple[torch.Tensor, float]:
    """Multi-positive NT-Xent over z [V*B, E] (view-major: rows v*B..v*B+B-1 are view v of images 0..B-1).

    Each row's positives are the other V-1 views of its image; everything else but itself is a negative.
    For V = 2 this is SimCLR's loss. Returns (loss, share of rows whose most similar row is a positive)."""
    n = z.shape[0]
    if n % n_views:
        raise ValueError(f"nt_xent: {n} rows are not {n_views} views of the same batch")
    b = n // n_views
    z = F.normalize(z.float(), dim=-1)
    logits = z @ z.T / temperature
    eye = torch.eye(n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    image = torch.arange(n, device=z.device) % b
    positive = (image[:, None] == image[None, :]) & ~eye
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    loss = -(log_prob.masked_fill(~positive, 0.0).sum(dim=1) / (n_views - 1)).mean()
    with torch.no_grad():
        acc = positive.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean().item()
    return loss, acc


def effective_rank(z: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): exp of the entropy of the normalised singular values of the centred
    rows z [N, E] — about E for well-spread embeddings, 1 when they lie on a line, 0 when all are equal."""
    z = z.detach().float()
    s = torch.linalg.svdvals(z - z.mean(dim=0))
    total = s.sum()
    if total <= 1e-6 * max(1.0, float(z.abs().max())):
        return 0.0
    p = s / total
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def _gather(z: torch.Tensor) -> torch.Tensor:
    """z of every rank, concatenated in rank order, with gradients flowing back to each rank's own rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z))


# --- patch correspondences between two crops ------------------------------------------------------------


def patch_centres(grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Centres [grid², 2] of a grid x grid patch layout in a view's normalised (x, y) coordinates
    (align_corners=False: cell j spans [2j/g - 1, 2(j+1)/g - 1]), in the backbone's raster token order."""
    c = (2 * torch.arange(grid, device=device, dtype=torch.float32) + 1) / grid - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([x.flatten(), y.flatten()], dim=-1)


def match_views(
    theta_a: torch.Tensor, grid_a: int, theta_b: torch.Tensor, grid_b: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each patch centre of view a lies in view b: (coords [B, Ta, 2] in b's normalised coordinates,
    valid [B, Ta] = the point is inside b's crop).

    theta_*: crop matrices [B, 2, 3] (augment.crop_thetas): view point (u, v) is image point theta @ (u, v, 1).
    grid_b is not needed for the mapping; it is taken so the call reads as a pair of patch layouts."""
    del grid_b  # the coordinates are resolution-free; sample_patch_grid resolves them on b's grid
    theta_a, theta_b = theta_a.float(), theta_b.float()
    centres = patch_centres(grid_a, theta_a.device)  # [Ta, 2]
    image = centres @ theta_a[:, :, :2].transpose(1, 2) + theta_a[:, None, :, 2]  # [B, Ta, 2]
    inv = torch.linalg.inv(theta_b[:, :, :2])  # crops are never degenerate: |det| = area * ratio > 0
    coords = (image - theta_b[:, None, :, 2]) @ inv.transpose(1, 2)
    valid = coords.abs().amax(dim=-1) <= 1.0
    return coords, valid


def sample_patch_grid(tokens: torch.Tensor, grid: int, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples [B, P, D] of a patch-token map tokens [B, grid², D] (raster order) at normalised
    coords [B, P, 2]; at a patch centre it returns that patch's token exactly. Points between the outer
    centres and the crop border take the border patches' values."""
    b, t, d = tokens.shape
    if t != grid * grid:
        raise ValueError(f"sample_patch_grid: {t} tokens are not a {grid}x{grid} grid")
    fmap = tokens.transpose(1, 2).reshape(b, d, grid, grid)
    out = F.grid_sample(fmap, coords.unsqueeze(1).to(fmap.dtype), "bilinear", "border", align_corners=False)
    return out.squeeze(2).transpose(1, 2)


# --- the model ------------------------------------------------------------------------------------------


class JointEmbedding(nn.Module):
    """Backbone + projector(s) + step counter; `training_loss` / `after_optimizer_step` for pipeline/train.py."""

    def __init__(self, cfg: SSLConfig) -> None:
        super().__init__()
        if cfg.objective not in ("vicreg", "simclr"):
            raise ValueError(f"JointEmbedding: objective must be vicreg or simclr, got {cfg.objective!r}")
        self.cfg = cfg
        self.timm_kwargs = cfg.timm_kwargs()
        d = cfg.embed_dim
        # timm initialises from the global RNG: seed it for construction only. The backbone is built first,
        # so it equals build_vit after torch.manual_seed(cfg.seed) (the random-init reference).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.backbone = build_vit(self.timm_kwargs, cfg.stem, cfg.drop_path_rate)
            self.projector = Projector(d, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, cfg.head_bn)
            if self.dense:
                self.dense_projector = Projector(
                    d, cfg.dense_proj_dim, cfg.dense_proj_dim, cfg.dense_proj_layers, cfg.head_bn
                )
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.global_views, self.local_view = cfg.view_augments()
        self.pool_index = block_index(cfg.depth, cfg.pool_layer)
        self.dense_index = block_index(cfg.depth, cfg.dense_layer)
        self._indicators: dict[str, float] = {}
        self._bad_steps = 0

    @property
    def dense(self) -> bool:
        return self.cfg.dense_weight > 0

    @property
    def export_backbone(self) -> nn.Module:
        """The network `export_encoder` writes: the backbone itself (no teacher here)."""
        return self.backbone

    def _views(
        self, x: torch.Tensor, g: torch.Generator
    ) -> list[tuple[ViewAugment, torch.Tensor, torch.Tensor]]:
        """[(augment, normalised views [B, 3, S, S], crop matrices [B, 2, 3])]: the globals, then the locals."""
        cfg = self.cfg
        mean = torch.tensor(cfg.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(cfg.std, device=x.device).view(1, 3, 1, 1)
        augments = [*self.global_views] + [self.local_view] * cfg.local_crops
        out = []
        for a in augments:
            view, theta = augment_view(x, a, g, with_theta=True)
            out.append((a, (view - mean) / std, theta.to(x.device)))
        return out

    def _tokens(self, views: torch.Tensor) -> dict[int, torch.Tensor]:
        """{block index: patch tokens [N, T, D] through the final norm} for the pooled and the dense block."""
        wanted = sorted({self.pool_index, self.dense_index} if self.dense else {self.pool_index})
        feats = self.backbone.forward_intermediates(
            views, indices=wanted, norm=True, output_fmt="NLC", intermediates_only=True, stop_early=True
        )
        return dict(zip(wanted, feats, strict=True))

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        if "image" not in batch:
            raise KeyError(f"{cfg.objective}: batch needs key 'image' ([B, 3, H, W]); got {sorted(batch)}")
        x = batch["image"]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{cfg.objective}: batch['image'] must be [B, 3, H, W], got {tuple(x.shape)}")
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        b = x.shape[0]
        rank, _ = rank_world()
        g = torch.Generator().manual_seed(derive_seed(cfg.seed, int(self.step), rank))
        views = self._views(x, g)

        # One backbone pass per crop size (globals together, locals together).
        sizes = sorted({a.size for a, _, _ in views}, reverse=True)
        tokens: list[dict[int, torch.Tensor]] = [{} for _ in views]
        for size in sizes:
            idx = [i for i, (a, _, _) in enumerate(views) if a.size == size]
            out = self._tokens(torch.cat([views[i][1] for i in idx]))
            for j, i in enumerate(idx):
                tokens[i] = {k: v[j * b : (j + 1) * b] for k, v in out.items()}

        pooled = [t[self.pool_index].mean(dim=1) for t in tokens]  # [B, D] per view
        z = [_gather(self.projector(p)) for p in pooled]
        logs: dict[str, float] = {}
        if cfg.objective == "vicreg":
            pairs = [(i, j) for i in range(2) for j in range(i + 1, len(z))]
            inv = torch.stack([F.mse_loss(z[i].float(), z[j].float()) for i, j in pairs]).mean()
            var = torch.stack([variance_loss(v) for v in z]).mean()
            cov = torch.stack([covariance_loss(v) for v in z]).mean()
            loss = cfg.sim_weight * inv + cfg.var_weight * var + cfg.cov_weight * cov
            logs |= {"inv_loss": float(inv.detach()), "var_loss": float(var.detach())}
            logs |= {"cov_loss": float(cov.detach())}
        else:
            loss, acc = nt_xent(torch.cat(z), len(z), cfg.temperature)
            logs |= {"nt_xent": float(loss.detach()), "contrastive_acc": acc}
        logs["global_loss"] = float(loss.detach())

        if self.dense:
            dense_loss, dense_logs = self._dense_loss(views, tokens)
            loss = loss + cfg.dense_weight * dense_loss
            logs |= dense_logs

        with torch.no_grad():
            feats = F.normalize(torch.cat(pooled[:2]).float(), dim=-1)
            patches = F.normalize(
                tokens[0][self.dense_index if self.dense else self.pool_index].float(), dim=-1
            )
            self._indicators = {
                "feature_std": float(feats.std(dim=0).mean()) * math.sqrt(feats.shape[1]),
                # spread of one image's tokens across positions: 0 when every patch says the same
                "patch_std": float(patches.std(dim=1).mean()) * math.sqrt(patches.shape[2]),
                "embedding_std": float(z[0].float().std(dim=0).mean()),
                "embedding_rank": effective_rank(z[0]),
            }
        return loss, logs | self._indicators

    def _dense_loss(
        self,
        views: list[tuple[ViewAugment, torch.Tensor, torch.Tensor]],
        tokens: list[dict[int, torch.Tensor]],
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """VICReg's terms on projected dense-layer patches, matched by location over every pair of views
        that includes a global one, in both directions."""
        cfg, k = self.cfg, self.dense_index
        p = cfg.patch_size
        proj = []
        for t in tokens:
            n, tt, d = t[k].shape
            proj.append(self.dense_projector(t[k].reshape(n * tt, d)).view(n, tt, -1))
        grids = [a.size // p for a, _, _ in views]
        inv_terms, matched, total = [], 0, 0
        for i in range(2):
            for j in range(i + 1, len(views)):
                for a, c in ((i, j), (j, i)):
                    coords, valid = match_views(views[a][2], grids[a], views[c][2], grids[c])
                    other = sample_patch_grid(proj[c], grids[c], coords)  # [B, Ta, E]
                    if valid.any():
                        inv_terms.append(
                            F.mse_loss(proj[a][valid].float(), other[valid].float(), reduction="sum")
                        )
                    matched += int(valid.sum())
                    total += valid.numel()
        e = proj[0].shape[-1]
        zero = proj[0].sum() * 0.0  # keeps the graph (and DDP's parameter set) when nothing overlaps
        inv = torch.stack(inv_terms).sum() / (max(1, matched) * e) if inv_terms else zero
        flat = [v.reshape(-1, e) for v in proj]
        var = torch.stack([variance_loss(v) for v in flat]).mean()
        cov = torch.stack([covariance_loss(v) for v in flat]).mean()
        loss = cfg.sim_weight * inv + cfg.var_weight * var + cfg.cov_weight * cov
        logs = {
            "dense_loss": float(loss.detach()),
            "dense_inv": float(inv.detach()),
            "dense_var": float(var.detach()),
            "dense_cov": float(cov.detach()),
            "matched_share": matched / max(1, total),
        }
        return loss, logs

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Step counter, collapse check (raises TrainingStopped)."""
        self.step.fill_(step + 1)
        reasons = self.collapse_reasons() if step >= self.cfg.collapse_warmup_steps else []
        self._bad_steps = self._bad_steps + 1 if reasons else 0
        if self._bad_steps >= self.cfg.collapse_patience:
            raise TrainingStopped(
                f"SSL pretraining ({self.cfg.objective}) collapsed: {'; '.join(reasons)} at step {step}, for "
                f"{self._bad_steps} consecutive steps. Try a lower lr, a larger var_weight (vicreg) or "
                "temperature (simclr), or check the augmentations leave the two views something in common."
            )

    def collapse_reasons(self) -> list[str]:
        """Indicators of the last training_loss past their thresholds, as 'name=value (...)'."""
        cfg, ind = self.cfg, self._indicators
        if not ind:
            return []
        reasons = []
        if ind["feature_std"] < cfg.min_feature_std:
            reasons.append(
                f"feature_std={ind['feature_std']:.4f} (< min_feature_std {cfg.min_feature_std}: every image "
                "gets the same pooled features)"
            )
        if ind["patch_std"] < cfg.min_feature_std:
            reasons.append(
                f"patch_std={ind['patch_std']:.4f} (< min_feature_std {cfg.min_feature_std}: every patch of "
                "an image gets the same features, so every token would be the same)"
            )
        if ind["embedding_rank"] < cfg.min_embedding_rank:
            reasons.append(
                f"embedding_rank={ind['embedding_rank']:.3f} (< min_embedding_rank {cfg.min_embedding_rank}: "
                "the projections span almost no dimensions)"
            )
        return reasons
