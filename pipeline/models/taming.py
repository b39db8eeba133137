"""A real taming-transformers VQGAN (and MAGE's variant of it), loadable from its released checkpoints.

The module tree and parameter names follow taming-transformers' `taming.models.vqgan.VQModel`
(`taming/modules/diffusionmodules/model.py` Encoder/Decoder, `VectorQuantizer2` as `quantize`), so a
released checkpoint such as the ImageNet f16 model (ch=128, ch_mult=[1,1,2,2,4], num_res_blocks=2,
attn_resolutions=[16], z_channels=256, embed_dim=256, n_embed=1024 or 16384) loads with strict=True.

layout="mage" is the VQGAN that MAGE ships (`vqgan_jax_strongaug.ckpt`, the tokenizer DiGIT's reference
code uses). Its module file (as bundled in LTH14/rcg, `pixel_generator/mage/taming/modules/...`) differs
from taming's in these ways, which we reproduce:
  - no attention blocks anywhere (no `attn` lists, no `mid.attn_1`);
  - no `quant_conv` / `post_quant_conv`: the encoder output is quantised directly;
  - ResnetBlock: conv1/conv2 without bias; the channel-changing shortcut (`nin_shortcut`, bias-free, or
    `conv_shortcut`) is applied to the block's *output* h (out->out channels), i.e. returns nin(h) + h;
  - Encoder: conv_in without bias, conv_out is 1x1, and downsampling is 2x2 average pooling (the
    encoder's resamp_with_conv defaults to False); the Decoder still upsamples with a conv;
  - Decoder up levels have num_res_blocks blocks (taming has num_res_blocks + 1);
  - pixels are in [0, 1] (MAGE trains on ToTensor() images and saves outputs * 255), not [-1, 1].
The codebook key `quantize.embedding.weight` for MAGE is assumed from its VQModel using taming's
VectorQuantizer2 interface; strict loading names any key that does not match.

The wrapper `TamingVQGAN` exposes the same tokenizer API as pipeline.models.vq.VQModel: images in [-1, 1]
<-> token ids [B, h, w].
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from pipeline.models.vq import TokenGrid

LAYOUTS = ("taming", "mage")


@dataclass
class TamingConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    resolution: int = 256  # only decides at which levels attention sits (curr_res in attn_resolutions)
    in_channels: int = 3
    out_ch: int = 3
    z_channels: int = 256
    double_z: bool = False
    embed_dim: int = 256
    n_embed: int = 1024
    dropout: float = 0.0
    layout: str = "taming"  # "taming" | "mage"
    extra: dict[str, Any] = field(default_factory=dict)  # ddconfig keys we do not use, kept for the record

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if self.layout not in LAYOUTS:
            raise ValueError(f"TamingConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not self.ch_mult:
            raise ValueError("TamingConfig.ch_mult must not be empty")
        if self.layout == "mage" and self.z_channels != self.embed_dim:
            raise ValueError(
                f"TamingConfig: layout 'mage' quantises the encoder output directly, so z_channels "
                f"({self.z_channels}) must equal embed_dim ({self.embed_dim})"
            )

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TamingConfig:
        """Accept taming's YAML as a dict: {model: {params: ...}}, {params: ...}, {ddconfig, n_embed, ...}
        or a flat dict of TamingConfig fields."""
        c = dict(config)
        if "model" in c:
            c = dict(c["model"])
        if "params" in c:
            c = dict(c["params"])
        flat: dict[str, Any] = {}
        if "ddconfig" in c:
            flat.update(c.pop("ddconfig"))
        flat.update(c)
        flat.update(flat.pop("extra", None) or {})  # our own asdict() output round-trips
        known = set(cls.__dataclass_fields__) - {"extra"}
        # Keys of taming's configs that do not change the inference graph.
        ignored = {
            "lossconfig",
            "ckpt_path",
            "ignore_keys",
            "image_key",
            "monitor",
            "target",
            "base_learning_rate",
            "sane_index_shape",  # only the shape of taming's returned indices; ours are always [B, h, w]
        }
        extra = {k: v for k, v in flat.items() if k not in known and k not in ignored}
        unknown_effect = sorted(
            set(extra) - {"resamp_with_conv", "give_pre_end", "colorize_nlabels", "remap"}
        )
        if unknown_effect:
            raise ValueError(f"taming config: unknown keys {unknown_effect}; known keys are {sorted(known)}")
        if extra.get("give_pre_end"):
            raise ValueError(
                "taming config: give_pre_end=True (decoder without its output layers) is not supported"
            )
        if extra.get("remap") is not None:
            raise ValueError("taming config: 'remap' (index remapping) is not supported")
        if extra.get("resamp_with_conv") is False and flat.get("layout", "taming") == "taming":
            raise ValueError("taming config: resamp_with_conv=False is not supported for layout 'taming'")
        return cls(**{k: v for k, v in flat.items() if k in known}, extra=extra)


# ---------------------------------------------------------------------------------------------------------
# building blocks (names match taming/modules/diffusionmodules/model.py)


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - taming's name
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            # Asymmetric (right/bottom) zero padding, as taming does: torch convs only pad symmetrically.
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, mage: bool):
        super().__init__()
        self.in_channels, self.out_channels, self.mage = in_channels, out_channels, mage
        bias = not mage
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=bias)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=bias)
        if in_channels != out_channels:
            # Released configs never set conv_shortcut=True, so only the 1x1 `nin_shortcut` is built.
            # MAGE's shortcut maps out->out channels because it is applied to h (see the module docstring).
            c_in = out_channels if mage else in_channels
            self.nin_shortcut = nn.Conv2d(c_in, out_channels, 1, stride=1, padding=0, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(h if self.mage else x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        # One head over all positions with scale c**-0.5: exactly taming's bmm/softmax attention.
        q, k, v = (t.reshape(b, 1, c, hh * ww).transpose(2, 3) for t in (self.q(h), self.k(h), self.v(h)))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Encoder(nn.Module):
    def __init__(self, cfg: TamingConfig):
        super().__init__()
        mage = cfg.layout == "mage"
        self.num_resolutions, self.num_res_blocks = len(cfg.ch_mult), cfg.num_res_blocks
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, stride=1, padding=1, bias=not mage)
        curr_res = cfg.resolution
        in_ch_mult = (1,) + tuple(cfg.ch_mult)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = cfg.ch * in_ch_mult[i_level]
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(cfg.num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, cfg.dropout, mage))
                block_in = block_out
                if not mage and curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            down = nn.Module()
            down.block = block
            if not mage:
                down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, with_conv=not mage)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, mage)
        if not mage:
            self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, mage)
        self.norm_out = Normalize(block_in)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        k = 1 if mage else 3
        self.conv_out = nn.Conv2d(block_in, z_out, k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if hasattr(down, "attn") and len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_1(h)
        if hasattr(self.mid, "attn_1"):
            h = self.mid.attn_1(h)
        h = self.mid.block_2(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: TamingConfig):
        super().__init__()
        mage = cfg.layout == "mage"
        self.num_resolutions = len(cfg.ch_mult)
        block_in = cfg.ch * cfg.ch_mult[-1]
        curr_res = cfg.resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, cfg.dropout, mage)
        if not mage:
            self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, cfg.dropout, mage)

        blocks_per_level = cfg.num_res_blocks if mage else cfg.num_res_blocks + 1
        up_levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = cfg.ch * cfg.ch_mult[i_level]
            for _ in range(blocks_per_level):
                block.append(ResnetBlock(block_in, block_out, cfg.dropout, mage))
                block_in = block_out
                if not mage and curr_res in cfg.attn_resolutions:
                    attn.append(AttnBlock(block_in))
            up = nn.Module()
            up.block = block
            if not mage:
                up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            up_levels.insert(0, up)  # taming prepends: self.up[i] is the level at resolution / 2**i
        self.up = nn.ModuleList(up_levels)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_1(h)
        if hasattr(self.mid, "attn_1"):
            h = self.mid.attn_1(h)
        h = self.mid.block_2(h)
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if hasattr(up, "attn") and len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """taming's VectorQuantizer2 at inference: nearest codebook entry by squared l2 (computed in fp32)."""

    def __init__(self, n_e: int, e_dim: int):
        super().__init__()
        self.n_e, self.e_dim = n_e, e_dim
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, h, w] -> ids [B, h, w]."""
        b, d, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
            e = self.embedding.weight.float()
            dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1)[None, :] - 2.0 * flat @ e.t()
            return dist.argmin(1).view(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """ids [B, h, w] -> [B, D, h, w]."""
        return self.embedding(indices.long()).permute(0, 3, 1, 2).contiguous()


class TamingVQModel(nn.Module):
    """The state-dict-compatible module tree: encoder, decoder, quantize, (post_)quant_conv."""

    def __init__(self, cfg: TamingConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        if cfg.layout == "taming":
            z_in = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
            self.quant_conv = nn.Conv2d(z_in, cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return self.quant_conv(h) if hasattr(self, "quant_conv") else h

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "post_quant_conv"):
            z_q = self.post_quant_conv(z_q)
        return self.decoder(z_q)


class TamingVQGAN(TokenGrid, nn.Module):
    """Tokenizer API over a taming/MAGE VQGAN: images in [-1, 1] <-> token ids [B, h, w]."""

    def __init__(self, cfg: TamingConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TamingVQModel(cfg)

    @property
    def codebook_size(self) -> int:
        return self.cfg.n_embed

    @property
    def downsample(self) -> int:
        return self.cfg.downsample

    def _to_model_range(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"expected images [B, {self.cfg.in_channels}, H, W] in [-1, 1], got shape {tuple(images.shape)}"
            )
        self.token_shape(images.shape[2], images.shape[3])
        return (images + 1.0) * 0.5 if self.cfg.layout == "mage" else images

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation latents [B, embed_dim, h, w] for images in [-1, 1]."""
        return self.model.encode_latents(self._to_model_range(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.quantize.indices(self.encode_latents(images))

    @torch.no_grad()
    def tokens_and_latents(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids [B, h*w] raster order, pre-quantisation latents [B, h*w, embed_dim]), as VQModel's."""
        z = self.encode_latents(images)
        ids = self.model.quantize.indices(z)
        return ids.flatten(1), z.flatten(2).transpose(1, 2).float()

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.ndim != 3:
            raise ValueError(f"expected token ids [B, h, w], got shape {tuple(indices.shape)}")
        if indices.min() < 0 or indices.max() >= self.cfg.n_embed:
            raise ValueError(
                f"token ids must lie in [0, {self.cfg.n_embed}), got [{int(indices.min())}, {int(indices.max())}]"
            )
        x = self.model.decode_latents(self.model.quantize.lookup(indices))
        if self.cfg.layout == "mage":
            x = x * 2.0 - 1.0
        return x.clamp(-1.0, 1.0)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(images))


# ---------------------------------------------------------------------------------------------------------
# loading


class _Opaque:
    """Inert stand-in for any non-tensor object in a Lightning checkpoint (callbacks, hparams, ...).

    It never runs the original class's code; we only need the checkpoint's "state_dict" tensors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


def _read_torch_checkpoint(path: Path) -> dict[str, Any]:
    """torch.load(weights_only=True), with every unknown global mapped to an inert `_Opaque` class."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (RuntimeError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError):
        unsafe = []  # a legacy (non-zip) file: torch.load below either reads it safely or says why not
    stand_ins = [(type(name.rsplit(".", 1)[-1], (_Opaque,), {}), name) for name in unsafe]
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: could not be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(
            f"{path}: expected a dict (a state dict or {{'state_dict': ...}}), got {type(obj).__name__}"
        )
    return obj


def read_state_dict(path: str | Path, drop_prefixes: Iterable[str] = ("loss.",)) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a Lightning/torch .ckpt/.pt/.pth, minus `drop_prefixes` keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: VQGAN checkpoint not found")
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    else:
        obj = _read_torch_checkpoint(path)
        state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    drop = tuple(drop_prefixes)
    out = {k: v for k, v in state.items() if not k.startswith(drop)}
    bad = sorted(k for k, v in out.items() if not torch.is_tensor(v))
    if bad:
        raise ValueError(f"{path}: state dict entries that are not tensors: {bad[:10]}")
    return out


def infer_config(state: dict[str, torch.Tensor], resolution: int = 256) -> TamingConfig:
    """Recover a TamingConfig from a state dict's key names and shapes (attention levels included)."""
    for key in ("encoder.conv_in.weight", "decoder.conv_in.weight", "quantize.embedding.weight"):
        if key not in state:
            raise ValueError(f"cannot infer a VQGAN config: key {key!r} missing from the state dict")
    layout = "taming" if "quant_conv.weight" in state else "mage"
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.down."))
    num_res_blocks = 1 + max(int(k.split(".")[4]) for k in state if k.startswith("encoder.down.0.block."))
    ch_mult = tuple(
        state[f"encoder.down.{i}.block.{num_res_blocks - 1}.conv2.weight"].shape[0] // ch
        for i in range(levels)
    )
    attn_levels = sorted(
        {int(k.split(".")[2]) for k in state if k.startswith("encoder.down.") and ".attn." in k}
    )
    n_embed, embed_dim = state["quantize.embedding.weight"].shape
    z_channels = state["decoder.conv_in.weight"].shape[1]
    enc_out = state["encoder.conv_out.weight"].shape[0]
    return TamingConfig(
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=num_res_blocks,
        attn_resolutions=tuple(resolution // 2**i for i in attn_levels),
        resolution=resolution,
        in_channels=state["encoder.conv_in.weight"].shape[1],
        out_ch=state["decoder.conv_out.weight"].shape[0],
        z_channels=z_channels,
        double_z=enc_out == 2 * z_channels,
        embed_dim=embed_dim,
        n_embed=n_embed,
        layout=layout,
    )


def load_taming_vqgan(
    path: str | Path, config: dict[str, Any] | None = None, drop_prefixes: Iterable[str] = ("loss.",)
) -> TamingVQGAN:
    """Load a taming (or MAGE) VQGAN checkpoint strictly; returns the tokenizer in eval mode.

    path: .safetensors, or a Lightning .ckpt / torch .pt read with torch.load(weights_only=True); a
    {"state_dict": ...} wrapper is unwrapped and `loss.*` (discriminator, LPIPS) keys are dropped.
    config: taming's model YAML as a dict (see TamingConfig.from_dict); None infers it from the keys.
    """
    state = read_state_dict(path, drop_prefixes)
    if config is None:
        cfg = infer_config(state)
    else:
        cfg = TamingConfig.from_dict(config)
        if "layout" not in config:
            # taming's and MAGE's YAMLs look alike; the keys tell them apart (MAGE has no quant_conv).
            cfg.layout = "taming" if "quant_conv.weight" in state else "mage"
            cfg.__post_init__()
    vq = TamingVQGAN(cfg)
    expected = vq.model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: state dict does not match a {cfg.layout} VQGAN with {asdict(cfg)}; "
            f"missing keys ({len(missing)}): {missing[:20]}; unexpected keys ({len(unexpected)}): {unexpected[:20]}"
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if state[k].shape != v.shape
    ]
    if wrong:
        raise ValueError(f"{path}: tensor shapes differ from the config (checkpoint vs model): {wrong[:20]}")
    vq.model.load_state_dict(state, strict=True)
    return vq.eval()


__all__ = [
    "TamingConfig",
    "TamingVQModel",
    "TamingVQGAN",
    "load_taming_vqgan",
    "read_state_dict",
    "infer_config",
]
