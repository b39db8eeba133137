"""SSLConfig: every knob of the encoder's self-supervised pretraining (params.yaml `pretrain_encoder`).

One dataclass for all objectives, so the params section and its validation have one definition:
  dino     DINO self-distillation with an EMA teacher (pipeline/ssl/dino.py); iBOT with ibot_weight > 0
  vicreg   VICReg (Bardes et al. 2022): invariance + variance + covariance of projected embeddings
  simclr   SimCLR's NT-Xent (Chen et al. 2020), multi-positive over all views of an image
The joint-embedding objectives (vicreg, simclr; pipeline/ssl/joint.py) can add a dense term: VICReg's three
terms on the projected patch features of the region two views share (VICRegL / DenseCL-style).
Knobs of one objective are ignored by the others (e.g. teacher temperatures by vicreg).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.ssl.augment import ViewAugment

OBJECTIVES = ("dino", "vicreg", "simclr")
STEMS = ("patch", "conv")  # pipeline/ssl/vit.py: timm's linear patch embedding | a stride-2 conv stack
CENTERINGS = ("ema", "sinkhorn")


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


@dataclass
class SSLConfig:
    objective: str = "dino"  # one of OBJECTIVES
    # backbone (timm VisionTransformer)
    img_size: int = 64
    stem: str = "patch"  # "patch": timm's linear patch embedding | "conv": stride-2 conv stack (vit.py)
    patch_size: int = 8
    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 3
    mlp_ratio: float = 4.0
    reg_tokens: int = 0
    drop_path_rate: float = 0.0
    # DINO projection heads: MLP -> bottleneck -> L2-normalised prototypes
    out_dim: int = 1024
    head_hidden_dim: int = 512
    head_bottleneck_dim: int = 128
    head_bn: bool = False  # BatchNorm in the head / projector MLPs (DINO's use_bn_in_head; VICReg has it)
    # views: two global crops (+ local crops); both global crops may be rotated by up to `rotate` degrees
    global_crop_scale: tuple[float, float] = (0.35, 1.0)
    global_crop_size: int | None = None  # None: img_size; smaller global crops cost less (fewer patches)
    local_crops: int = 4
    local_crop_size: int = 32
    local_crop_scale: tuple[float, float] = (0.1, 0.35)
    rotate: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # max hue shift as a fraction of the colour circle (0.5 = any hue)
    grayscale_p: float = 0.2
    noise_p: float = 0.0  # share of views given Gaussian pixel noise at an SNR drawn from noise_snr_db
    noise_snr_db: tuple[float, float] = (5.0, 30.0)
    # DINO distillation
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 30
    centering: str = "ema"  # "ema": DINO's EMA centre | "sinkhorn": DINOv2's Sinkhorn-Knopp batch balancing
    center_momentum: float = 0.9
    sinkhorn_iters: int = 3
    momentum_start: float = 0.99  # teacher EMA momentum, cosine-increased to 1.0 at the last step
    # KoLeo regulariser (DINOv2) on the student's global-crop CLS features: spreads them apart (0 = off)
    koleo_weight: float = 0.0
    # iBOT masked-patch loss (0 = off)
    ibot_weight: float = 0.0
    mask_prob: float = 0.5  # share of global crops that get masked
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # share of patches masked in such a crop
    patch_out_dim: int = 1024
    # joint-embedding objectives (vicreg, simclr): an MLP projector on the mean-pooled patch tokens of
    # block pool_layer (through the final norm)
    pool_layer: int = -1
    proj_hidden_dim: int = 512
    proj_dim: int = 512
    proj_layers: int = 3  # linear layers of the projector (VICReg's expander: 3)
    sim_weight: float = 25.0  # VICReg's lambda (invariance), mu (variance), nu (covariance)
    var_weight: float = 25.0
    cov_weight: float = 1.0
    temperature: float = 0.2  # simclr's NT-Xent temperature
    # dense term (vicreg, simclr): VICReg's terms on projected patch features of block dense_layer, matched
    # across views by image location (0 = off)
    dense_weight: float = 0.0
    dense_layer: int = -3
    dense_proj_dim: int = 256  # the dense projector: dense_proj_layers linear layers of this width (it runs
    dense_proj_layers: int = 2  # on every patch, so it is kept narrower than the global one)
    # collapse detection: after warm-up, `patience` consecutive bad steps raise TrainingStopped
    collapse_warmup_steps: int = 50
    collapse_patience: int = 10
    min_feature_std: float = 0.02  # std of L2-normalised pooled/CLS features across the batch, x sqrt(D)
    min_batch_entropy: float = 0.02  # dino: entropy of the batch-mean teacher distribution / log K
    max_teacher_entropy: float = 0.98  # dino: mean per-image teacher entropy / log K
    min_embedding_rank: float = 2.0  # vicreg/simclr: effective rank of a view's projected embeddings
    # optimisation (used by pretrain_encoder to build the shared loop's TrainConfig)
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.04
    grad_clip: float = 3.0
    # data
    fresh_images: bool = False  # built-in data: new train-split images every step (see pipeline/ssl/data.py)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in (
            "global_crop_scale",
            "local_crop_scale",
            "blur_sigma",
            "mask_ratio",
            "noise_snr_db",
            "mean",
            "std",
        ):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        vit_kwargs(self.img_size, self.patch_size, self.embed_dim, self.depth, self.num_heads)  # validates
        if self.objective not in OBJECTIVES:
            raise ValueError(f"SSLConfig.objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        if self.global_crop_size is not None and (
            self.global_crop_size % self.patch_size != 0 or self.global_crop_size < self.patch_size
        ):
            raise ValueError(
                f"SSLConfig.global_crop_size: {self.global_crop_size} must be a positive multiple of "
                f"patch_size {self.patch_size} (or null: img_size)"
            )
        if self.local_crops > 0 and self.local_crop_size % self.patch_size != 0:
            raise ValueError(
                f"SSLConfig.local_crop_size: {self.local_crop_size} must be a multiple of "
                f"patch_size {self.patch_size}"
            )
        for name in ("global_crop_scale", "local_crop_scale", "mask_ratio"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"SSLConfig.{name}: expected 0 < lo <= hi <= 1, got {(lo, hi)}")
        if self.stem not in STEMS:
            raise ValueError(f"SSLConfig.stem: expected one of {STEMS}, got {self.stem!r}")
        if self.centering not in CENTERINGS:
            raise ValueError(f"SSLConfig.centering: expected one of {CENTERINGS}, got {self.centering!r}")
        if not 0 <= self.noise_p <= 1 or self.noise_snr_db[0] > self.noise_snr_db[1]:
            raise ValueError(
                f"SSLConfig: noise_p must lie in [0, 1] and noise_snr_db be (lo, hi) with lo <= hi, got "
                f"{self.noise_p} and {self.noise_snr_db}"
            )
        if not 0 <= self.momentum_start <= 1 or not 0 <= self.center_momentum <= 1:
            raise ValueError("SSLConfig: momentum_start and center_momentum must lie in [0, 1]")
        for name in (
            "steps",
            "batch_size",
            "out_dim",
            "patch_out_dim",
            "proj_dim",
            "proj_layers",
            "dense_proj_dim",
            "dense_proj_layers",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"SSLConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if min(self.student_temp, self.teacher_temp, self.warmup_teacher_temp, self.temperature) <= 0:
            raise ValueError("SSLConfig: temperatures must be > 0")
        used = ("pool_layer", "dense_layer") if self.dense_weight > 0 else ("pool_layer",)
        for name in used if self.objective != "dino" else ():
            layer = getattr(self, name)
            if not -self.depth <= layer < self.depth:
                raise ValueError(
                    f"SSLConfig.{name}: {layer} is out of range for depth {self.depth} "
                    f"(valid: {-self.depth}..{self.depth - 1}; -1 = last block)"
                )
        for name in ("sim_weight", "var_weight", "cov_weight", "dense_weight", "rotate"):
            if getattr(self, name) < 0:
                raise ValueError(f"SSLConfig.{name}: expected >= 0, got {getattr(self, name)}")
        if self.objective != "dino":
            for name in ("ibot_weight", "koleo_weight"):
                if getattr(self, name) > 0:
                    raise ValueError(
                        f"SSLConfig.{name}: {getattr(self, name)} is a DINO term; objective "
                        f"{self.objective!r} does not use it (set it to 0)"
                    )
        elif self.dense_weight > 0:
            raise ValueError(
                "SSLConfig.dense_weight: the dense term belongs to the joint-embedding objectives "
                "(vicreg, simclr); DINO's patch-level term is iBOT (ibot_weight)"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "pretrain_encoder") -> SSLConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown key(s) {', '.join(unknown)}; expected some of {sorted(known)}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def timm_kwargs(self) -> dict[str, Any]:
        return vit_kwargs(
            self.img_size,
            self.patch_size,
            self.embed_dim,
            self.depth,
            self.num_heads,
            self.mlp_ratio,
            self.reg_tokens,
        )

    def view_augments(self) -> tuple[tuple[ViewAugment, ViewAugment], ViewAugment]:
        """(the two global views, the local view). DINO's recipe: global view 1 always blurred, view 2 rarely
        blurred and sometimes solarised, local views half blurred; one colour recipe for all."""
        colour = dict(
            jitter_p=self.jitter_p,
            brightness=self.brightness,
            contrast=self.contrast,
            saturation=self.saturation,
            hue=self.hue,
            grayscale_p=self.grayscale_p,
            blur_sigma=self.blur_sigma,
            rotate=self.rotate,
            noise_p=self.noise_p,
            noise_snr_db=self.noise_snr_db,
        )
        size, scale = self.global_crop_size or self.img_size, self.global_crop_scale
        global_views = (
            ViewAugment(size, scale, blur_p=1.0, **colour),
            ViewAugment(size, scale, blur_p=0.1, solarize_p=0.2, **colour),
        )
        return global_views, ViewAugment(self.local_crop_size, self.local_crop_scale, blur_p=0.5, **colour)
