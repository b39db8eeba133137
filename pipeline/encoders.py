"""Encoder registry: the SSL ViT whose patch features DiGIT clusters into tokens.

Sources (chosen in params):
  timm    a timm model name with its pretrained weights from the model hub (the real users' path)
  file    local weights (.pth / .safetensors) for a timm architecture, in timm layout or Meta's DINOv2
          layout; timm's vision_transformer.checkpoint_filter_fn renames Meta keys, folds the CLS position
          into cls_token and resamples pos_embed to the requested img_size. Or a directory holding an
          encoder checkpoint of this pipeline (as `ssl` below; the project's published encoder is one)
  ssl     a ViT pretrained inside this pipeline: a checkpoint directory (model.safetensors + config.json,
          meta kind "ssl_vit") rebuilt as timm VisionTransformer(**timm_kwargs)
  random  random init, for unit tests only; it warns, and says so in describe()

Features (as in the paper): output of block `layer` (default -3, third from last) through the encoder's
final LayerNorm, CLS and register tokens dropped: [B, T = (img_size / patch)², D] in raster order.
Nothing is unpickled: safetensors, or torch.load(weights_only=True) inside timm's loader.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from pipeline.checkpoint import CONFIG_FILE, MODEL_FILE, CheckpointError, checkpoint_sha256, load_checkpoint
from pipeline.config import WEIGHT_SUFFIXES
from pipeline.io import read_json, sha256_file
from pipeline.ssl.vit import build_vit

log = logging.getLogger(__name__)

SOURCES = ("timm", "file", "ssl", "random")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_LAYER = -3


class EncoderError(ValueError):
    pass


class RandomWeightsWarning(UserWarning):
    """An encoder with random weights was built: its tokens mean nothing (tests only)."""


@dataclass(eq=False)
class Encoder:
    model: VisionTransformer
    layer: int  # block index as configured; negative counts from the last block
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    name: str
    weights: str = ""  # path or hub id the weights came from; "" for random
    weights_sha256: str = ""

    def __post_init__(self) -> None:
        depth = len(self.model.blocks)
        if not -depth <= self.layer < depth:
            raise EncoderError(
                f"layer: {self.layer} is out of range for '{self.name}' with {depth} blocks "
                f"(expected {-depth}..{depth - 1}; -3 = third from last, the paper's choice)"
            )
        if self.img_size % self.patch_size != 0:
            raise EncoderError(
                f"img_size: {self.img_size} is not a multiple of the patch size {self.patch_size} "
                f"of '{self.name}'"
            )
        if isinstance(self.model.norm, torch.nn.Identity):
            # timm puts the final norm after pooling (fc_norm) for avg-pool ViTs: tokens get none.
            log.warning("encoder '%s' has no final token norm; patch features are not normalised", self.name)
        self.model.eval().requires_grad_(False)

    @property
    def block_index(self) -> int:
        """The chosen block as a non-negative index."""
        return self.layer % len(self.model.blocks)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size // self.patch_size, self.img_size // self.patch_size)

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    @property
    def dim(self) -> int:
        return int(self.model.embed_dim)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> Encoder:
        self.model.to(device)
        return self

    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 [0, 255] or float [0, 1] images, [B, 3, H, W] or [B, H, W, 3] → normalised float32 NCHW."""
        x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        if x.ndim != 4:
            raise EncoderError(
                f"images: expected a batch [B, 3, H, W] or [B, H, W, 3], got shape {tuple(x.shape)}"
            )
        if x.shape[1] != 3 and x.shape[-1] == 3:
            x = x.permute(0, 3, 1, 2)
        if x.shape[1] != 3:
            raise EncoderError(f"images: expected 3 colour channels, got shape {tuple(x.shape)}")
        x = x.to(self.device)
        if x.dtype == torch.uint8:
            x = x.to(torch.float32) / 255.0
        elif x.is_floating_point():
            x = x.to(torch.float32)
            lo, hi = float(x.min()), float(x.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise EncoderError(
                    f"images: float images must lie in [0, 1] (got values in [{lo:.3g}, {hi:.3g}]); "
                    "pass uint8 for 0..255 data"
                )
        else:
            raise EncoderError(f"images: expected uint8 or float pixels, got dtype {x.dtype}")
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bicubic", antialias=True)
            x = x.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def patch_features(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float32 [B, T, D] patch features (raster order) on the encoder's device."""
        return self.features_of_input(self.preprocess(images))

    @torch.inference_mode()
    def features_of_input(self, x: torch.Tensor) -> torch.Tensor:
        """float32 [B, T, D]: the layer's patch tokens through the final norm, for an input that is already
        the model's (resized, normalised) — `preprocess`'s output or an unclamped equivalent."""
        (feats,) = self.model.forward_intermediates(
            x,
            indices=[self.block_index],
            norm=True,
            output_fmt="NLC",
            intermediates_only=True,
            stop_early=True,
        )
        return feats.float()

    def describe(self) -> dict[str, Any]:
        """JSON-able attributes to store next to the features (e.g. Zarr attrs)."""
        return {
            "encoder": self.name,
            "source": self.source,
            "layer": self.layer,
            "block_index": self.block_index,
            "depth": len(self.model.blocks),
            "img_size": self.img_size,
            "patch_size": self.patch_size,
            "grid": list(self.grid),
            "dim": self.dim,
            "mean": list(self.mean),
            "std": list(self.std),
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "random_weights": self.source == "random",
        }


def sha256_state_dict(state: dict[str, torch.Tensor]) -> str:
    """Content hash of tensors, for weights that have no file of ours (the hub cache)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _pretrained_mean_std(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _check_timm_name(source: str, name: str | None) -> str:
    if not name:
        raise EncoderError(
            f"encoder source '{source}' needs `name`: a timm model, e.g. vit_base_patch14_reg4_dinov2"
        )
    if not timm.is_model(name):
        raise EncoderError(f"encoder name '{name}' is not a timm model (see timm.list_models('*dinov2*'))")
    return name


def _size_kwargs(img_size: int | None) -> dict[str, Any]:
    return {} if img_size is None else {"img_size": img_size}


def _build_timm_hub(name: str, img_size: int | None, model_kwargs: dict[str, Any]) -> torch.nn.Module:
    try:
        return timm.create_model(
            name, pretrained=True, num_classes=0, **_size_kwargs(img_size), **model_kwargs
        )
    except Exception as e:  # hub/network failures come as OSError, httpx or HF errors: report them all
        raise EncoderError(
            f"encoder source 'timm': could not fetch the pretrained weights of '{name}' from the model hub "
            f"({type(e).__name__}: {e}). Offline? Download the weights on a connected machine and set "
            "encoder source: file with weights: path/to/file.pth (or .safetensors), "
            "in timm or Meta DINOv2 layout."
        ) from e


def is_encoder_dir(weights: str | Path | None) -> bool:
    """Whether `weights` is a directory with an encoder checkpoint of this pipeline (pipeline/ssl/vit.py)."""
    return bool(weights) and (Path(str(weights)) / CONFIG_FILE).is_file()


def _build_from_file(
    name: str, weights: str | Path | None, img_size: int | None, model_kwargs: dict[str, Any]
) -> torch.nn.Module:
    if not weights:
        raise EncoderError(
            "encoder source 'file' needs `weights`: a path to a .pth or .safetensors file, or an encoder "
            "directory (config.json + model.safetensors) written by pretrain_encoder"
        )
    path = Path(weights)
    if path.is_dir():
        raise EncoderError(
            f"encoder weights: {path} is a directory without {CONFIG_FILE}; expected a .pth / .safetensors "
            "file or an encoder directory written by pretrain_encoder"
        )
    if not path.is_file():
        raise EncoderError(f"encoder weights: {path} does not exist or is not a file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise EncoderError(f"encoder weights: {path} should end in one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        # timm's loader: safetensors, or torch.load(weights_only=True); then checkpoint_filter_fn.
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=0,
            **_size_kwargs(img_size),
            **model_kwargs,
        )
    except Exception as e:
        raise EncoderError(
            f"encoder weights: could not load {path} into timm model '{name}' ({type(e).__name__}: {e})"
        ) from e


def _build_random(
    name: str, img_size: int | None, model_kwargs: dict[str, Any], seed: int
) -> torch.nn.Module:
    msg = f"encoder '{name}' uses RANDOM weights (source: random) — for tests only, its tokens mean nothing"
    warnings.warn(msg, RandomWeightsWarning, stacklevel=3)
    log.warning(msg)
    # timm initialises from the global RNG: seed it for this call only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(
            name, pretrained=False, num_classes=0, **_size_kwargs(img_size), **model_kwargs
        )


def _build_ssl(
    directory: str | Path | None, img_size: int | None
) -> tuple[VisionTransformer, dict[str, Any]]:
    if not directory:
        raise EncoderError(
            "encoder source 'ssl' needs `weights`: the pretrained encoder directory (models/encoder)"
        )
    cfg_path = Path(directory) / CONFIG_FILE
    if cfg_path.is_file() and not (Path(directory) / MODEL_FILE).is_file():
        marker = read_json(cfg_path)
        if isinstance(marker, dict) and marker.get("kind") == "unused":
            raise EncoderError(
                f"{cfg_path}: pretrain_encoder trained no encoder here ({marker.get('reason', '')}); "
                "rerun it with encoder.source: ssl"
            )
    try:
        state, meta, _ = load_checkpoint(directory)
    except CheckpointError as e:
        raise EncoderError(f"encoder source 'ssl': {e}") from e
    if meta.get("kind") != "ssl_vit":
        raise EncoderError(f"{cfg_path}: kind is {meta.get('kind')!r}, expected 'ssl_vit'")
    missing = [k for k in ("timm_kwargs", "mean", "std", "img_size", "patch_size") if k not in meta]
    if missing:
        raise EncoderError(f"{cfg_path}: missing key(s) {', '.join(missing)}")
    kwargs = dict(meta["timm_kwargs"])
    kwargs["img_size"] = img_size or meta["img_size"]
    try:
        model = build_vit(kwargs, meta.get("stem", "patch"))
    except (TypeError, ValueError) as e:
        raise EncoderError(f"{cfg_path}: timm_kwargs/stem do not build a VisionTransformer ({e})") from e
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        # Served at another resolution than it was trained at: resample positions like timm does.
        n_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        old = meta["img_size"] // meta["patch_size"]
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=list(model.patch_embed.grid_size),
            old_size=[old, old],
            num_prefix_tokens=n_prefix,
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise EncoderError(
            f"{Path(directory) / MODEL_FILE}: does not match timm_kwargs in {cfg_path}: {e}"
        ) from e
    return model, meta


def build_encoder(
    source: str,
    name: str | None = None,
    weights: str | Path | None = None,
    layer: int = DEFAULT_LAYER,
    img_size: int | None = None,
    mean: tuple[float, float, float] | list[float] | None = None,
    std: tuple[float, float, float] | list[float] | None = None,
    seed: int = 0,
    model_kwargs: dict[str, Any] | None = None,
) -> Encoder:
    """Build the tokenizer's encoder from params.

    name: timm architecture (timm/file/random), e.g. "vit_base_patch14_reg4_dinov2.lvd142m"; for "ssl"
          optional (defaults to "ssl_vit").
    weights: file (source file) or checkpoint directory (source ssl; source file also takes one: a
          published encoder); unused otherwise.
    img_size: input resolution (multiple of the patch size); None = the model's own (518 for DINOv2 —
          the paper uses 224).
    mean/std: override the normalisation; default = the weights' own (pretrained cfg or ssl meta).
    seed: initialisation seed (source random only).
    model_kwargs: extra timm constructor arguments (e.g. depth=2 for a tiny test model; timm/file/random).
    """
    if source not in SOURCES:
        raise EncoderError(f"encoder source: {source!r} is not one of {', '.join(SOURCES)}")
    model_kwargs = dict(model_kwargs or {})
    if source == "ssl" or source == "file" and is_encoder_dir(weights):
        if model_kwargs:
            raise EncoderError(
                f"encoder source '{source}' with an encoder directory: model_kwargs are not used (the "
                "architecture is in its config.json)"
            )
        model, meta = _build_ssl(weights, img_size)
        default_mean, default_std = tuple(meta["mean"]), tuple(meta["std"])
        name = name or "ssl_vit"
        weights_str, sha = str(weights), checkpoint_sha256(weights)
        if mean is not None and tuple(mean) != default_mean or std is not None and tuple(std) != default_std:
            log.warning("encoder '%s': mean/std override differs from the values it was trained with", name)
    else:
        name = _check_timm_name(source, name)
        if source == "timm":
            model = _build_timm_hub(name, img_size, model_kwargs)
            weights_str, sha = f"timm:{name}", sha256_state_dict(model.state_dict())
        elif source == "file":
            model = _build_from_file(name, weights, img_size, model_kwargs)
            weights_str, sha = str(weights), sha256_file(weights)
        else:
            model = _build_random(name, img_size, model_kwargs, seed)
            weights_str, sha = "", ""
        default_mean, default_std = _pretrained_mean_std(model)
    if not isinstance(model, VisionTransformer):
        raise EncoderError(f"encoder '{name}': expected a timm VisionTransformer, got {type(model).__name__}")

    return Encoder(
        model=model,
        layer=int(layer),
        img_size=int(model.patch_embed.img_size[0]),
        mean=tuple(float(v) for v in (mean if mean is not None else default_mean)),
        std=tuple(float(v) for v in (std if std is not None else default_std)),
        source=source,
        name=name,
        weights=weights_str,
        weights_sha256=sha,
    )
