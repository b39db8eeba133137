"""Stage-2 renderer: DiGIT tokens of an image -> the pixel VQ model's tokens of the same image.

Decoder-only and pre-LN like the reference's stage 2 (fairseq_user/image_generation_stage2/model.py:
decoder_normalize_before=True); it reuses gpt.py's Transformer trunk (so `norm: post` works here too), KV
cache and sampling loop. The non-autoregressive MaskGIT-style renderer is in nar_renderer.py; `load_renderer`
returns whichever a checkpoint holds. Sequence: [s1 .. sN (DiGIT tokens), SEP, v1 .. vM (VQ tokens)]; the two segments have their
own token tables and their own position tables (SEP is VQ-segment position 0), and the loss is on the VQ
segment only: the outputs at SEP, v1 .. v(M-1) predict v1 .. vM, the DiGIT segment has no target. Trained on
the true DiGIT tokens of each image (teacher forcing); at sampling time it is fed the stage-1 GPT's tokens.

`aligned` (optional, on in the default params): both token sequences are raster scans of grids over the same
image, so the input that predicts VQ token j also gets an embedding of the DiGIT token at j's image location.
The prefix still carries every DiGIT token; the shortcut only spares a small model from having to learn the
grid correspondence through attention, which it otherwise spends most of a CPU-sized budget on.

`digit_merge` m (optional): each m×m block of DiGIT tokens becomes one prefix position (the m² embeddings
concatenated, then a linear map), and with `aligned` each VQ input gets its block's merged embedding. A DiGIT
grid m times finer than the VQ grid then costs what a grid as coarse as the VQ's costs: the prefix is N / m²
long, and every VQ token sees all the DiGIT tokens of its cell, not one of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoint import CONFIG_FILE, CheckpointError, load_model
from pipeline.io import read_json
from pipeline.models.gpt import (
    GPT_SIZES,
    Transformer,
    autoregress,
    check_norm,
    embed_scale,
    init_model,
    rowwise,
)
from pipeline.sampling import process_logits, row_uniforms, sample_with_uniforms

if TYPE_CHECKING:
    from pipeline.models.nar_renderer import NARRenderer

RENDERER_SIZES: dict[str, dict[str, int]] = dict(GPT_SIZES)


@dataclass
class RendererConfig:
    digit_vocab_size: int = 512  # K of the DiGIT tokenizer
    vq_vocab_size: int = 512  # codebook size of the pixel VQ model (SEP is one extra input id)
    digit_len: int = 64  # N: DiGIT tokens per image
    vq_len: int = 64  # M: VQ tokens per image
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    ffn_dim: int = 1024
    dropout: float = 0.0
    label_smoothing: float = 0.0
    bias: bool = True
    aligned: bool = False  # add the DiGIT token at the same image location to each VQ input
    digit_grid: tuple[int, int] | None = None  # (rows, cols) of the DiGIT tokens; needed when aligned
    vq_grid: tuple[int, int] | None = None  # (rows, cols) of the VQ tokens; needed when aligned
    norm: str = "pre"  # pre | post (see gpt.py)
    attn_dropout: float | None = None  # None = dropout
    digit_merge: int = 1  # m: each m×m block of DiGIT tokens is one prefix position (needs digit_grid)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"RendererConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        check_norm(self.norm, "RendererConfig")
        for name, length in (("digit_grid", self.digit_len), ("vq_grid", self.vq_len)):
            grid = getattr(self, name)
            if grid is not None:
                grid = tuple(int(v) for v in grid)
                setattr(self, name, grid)
                if len(grid) != 2 or grid[0] * grid[1] != length:
                    raise ValueError(f"RendererConfig.{name}: {grid} is not a 2-D grid of {length} tokens")
            elif self.aligned:
                raise ValueError(f"RendererConfig: aligned needs {name} (the token grid's rows, cols)")
        for name in ("digit_vocab_size", "vq_vocab_size", "digit_len", "vq_len", "digit_merge"):
            if getattr(self, name) < 1:
                raise ValueError(f"RendererConfig.{name}: expected >= 1, got {getattr(self, name)}")
        m = self.digit_merge
        if m > 1 and (self.digit_grid is None or self.digit_grid[0] % m or self.digit_grid[1] % m):
            raise ValueError(
                f"RendererConfig.digit_merge: {m} needs a digit_grid whose rows and cols it divides, "
                f"got {self.digit_grid}"
            )

    @property
    def merged_grid(self) -> tuple[int, int] | None:
        """The DiGIT grid in merged blocks (the prefix's grid)."""
        if self.digit_grid is None:
            return None
        return (self.digit_grid[0] // self.digit_merge, self.digit_grid[1] // self.digit_merge)

    @property
    def prefix_len(self) -> int:
        """DiGIT positions of the sequence: N / digit_merge²."""
        return self.digit_len // self.digit_merge**2


def renderer_config(
    size: str, digit_vocab_size: int, vq_vocab_size: int, digit_len: int, vq_len: int, **overrides
) -> RendererConfig:
    """A RendererConfig of a named size (RENDERER_SIZES, the GPT's sizes), fields overridable by keyword."""
    if size not in RENDERER_SIZES:
        raise ValueError(f"unknown renderer size {size!r}; expected one of {sorted(RENDERER_SIZES)}")
    fields = {
        **RENDERER_SIZES[size],
        "digit_vocab_size": digit_vocab_size,
        "vq_vocab_size": vq_vocab_size,
        "digit_len": digit_len,
        "vq_len": vq_len,
    }
    return RendererConfig(**{**fields, **overrides})


def aligned_index(digit_grid: tuple[int, int], vq_grid: tuple[int, int]) -> torch.Tensor:
    """[M] long: for each VQ token (raster order), the raster index of the DiGIT token whose grid cell holds
    the VQ cell's centre."""
    (dh, dw), (vh, vw) = digit_grid, vq_grid
    rows = ((torch.arange(vh) + 0.5) * dh / vh).long().clamp(max=dh - 1)
    cols = ((torch.arange(vw) + 0.5) * dw / vw).long().clamp(max=dw - 1)
    return (rows[:, None] * dw + cols[None, :]).flatten()


def merge_blocks(x: torch.Tensor, grid: tuple[int, int], m: int) -> torch.Tensor:
    """[B, h*w, D] (raster over grid) -> [B, (h/m)*(w/m), m*m*D]: each m×m block's rows concatenated, blocks in
    raster order."""
    (h, w), (b, _, d) = grid, x.shape
    x = x.view(b, h // m, m, w // m, m, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // m) * (w // m), m * m * d)


def check_ids(ids: torch.Tensor, length: int, vocab: int, name: str) -> None:
    """Token ids must be int64 [B, length] in [0, vocab); the error names the tensor and what is wrong."""
    if ids.dim() != 2 or ids.shape[1] != length or ids.dtype != torch.long:
        raise ValueError(f"{name}: expected int64 ids [B, {length}], got {ids.dtype} {tuple(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"{name}: ids must be in [0, {vocab}), found range [{lo}, {hi}]")


class Renderer(nn.Module):
    def __init__(self, config: RendererConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        c = config
        self.digit_emb = nn.Embedding(c.digit_vocab_size, c.n_embd)
        self.digit_pos = nn.Embedding(c.prefix_len, c.n_embd)
        if c.digit_merge > 1:
            self.merge_proj = nn.Linear(c.digit_merge**2 * c.n_embd, c.n_embd)
        self.vq_emb = nn.Embedding(c.vq_vocab_size + 1, c.n_embd)  # last row: SEP
        self.vq_pos = nn.Embedding(c.vq_len, c.n_embd)  # SEP at 0, v_j (as input) at j
        self.drop = nn.Dropout(c.dropout)
        self.trunk = Transformer(
            c.n_layer, c.n_head, c.n_embd, c.ffn_dim, c.dropout, c.bias, c.norm, c.attn_dropout
        )
        self.head = nn.Linear(c.n_embd, c.vq_vocab_size, bias=False)
        if c.aligned:
            self.aligned_emb = nn.Embedding(c.digit_vocab_size, c.n_embd)
            if c.digit_merge > 1:
                self.aligned_merge_proj = nn.Linear(c.digit_merge**2 * c.n_embd, c.n_embd)
            index = aligned_index(c.merged_grid, c.vq_grid)
            self.register_buffer("align_index", index, persistent=False)
        self.embed_scale = embed_scale(c.norm, c.n_embd)
        init_model(self, c.norm, c.n_layer, torch.Generator().manual_seed(seed))

    @property
    def sep(self) -> int:
        return self.config.vq_vocab_size

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint_meta(self) -> dict:
        return {"kind": "renderer", "config": asdict(self.config)}

    def _aligned(self, digit: torch.Tensor) -> torch.Tensor | None:
        """[B, M, D]: row j is the aligned embedding added to the input that predicts VQ token j (0-based)."""
        if not self.config.aligned:
            return None
        x = self.aligned_emb(digit)
        if self.config.digit_merge > 1:
            x = self._merged(x, self.aligned_merge_proj)
        return x[:, self.align_index] * self.embed_scale

    def _merged(self, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
        """Token embeddings [B, N, D] -> one per merged block [B, N / m², D]."""
        return linear(merge_blocks(x, self.config.digit_grid, self.config.digit_merge))

    def _prefix(self, digit: torch.Tensor, aligned: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of [s1 .. sN, SEP] (blocks of digit_merge² tokens merged): [B, N / m² + 1, D]."""
        device = digit.device
        s = self.embed_scale
        x = self.digit_emb(digit)
        if self.config.digit_merge > 1:
            x = self._merged(x, self.merge_proj)
        x = x * s + self.digit_pos(torch.arange(x.shape[1], device=device))
        sep_ids = torch.full((digit.shape[0], 1), self.sep, device=device)
        sep = self.vq_emb(sep_ids) * s + self.vq_pos.weight[:1]
        if aligned is not None:
            sep = sep + aligned[:, :1]
        return self.drop(torch.cat([x, sep], dim=1))

    def _embed_vq(self, ids: torch.Tensor, i: int, aligned: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings of VQ tokens i .. i+t-1 (0-based), which sit at VQ-segment positions i+1 .. i+t."""
        positions = torch.arange(i + 1, i + 1 + ids.shape[1], device=ids.device)
        x = self.vq_emb(ids) * self.embed_scale + self.vq_pos(positions)
        if aligned is not None:
            x = x + aligned[:, i + 1 : i + 1 + ids.shape[1]]
        return self.drop(x)

    def logits(self, digit: torch.Tensor, vq: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, M, V]: row j predicts v(j+1) from s1..sN, SEP, v1..vj."""
        aligned = self._aligned(digit)
        x = torch.cat([self._prefix(digit, aligned), self._embed_vq(vq[:, :-1], 0, aligned)], dim=1)
        h = self.trunk(x)
        return self.head(h[:, self.config.prefix_len :])

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """batch {"digit": [B, N] long, "vq": [B, M] long} -> (CE over the VQ segment, {"acc"})."""
        c = self.config
        digit, vq = batch["digit"], batch["vq"]
        check_ids(digit, c.digit_len, c.digit_vocab_size, "batch['digit']")
        check_ids(vq, c.vq_len, c.vq_vocab_size, "batch['vq']")
        if digit.shape[0] != vq.shape[0]:
            raise ValueError(f"batch: digit has {digit.shape[0]} rows but vq has {vq.shape[0]}")
        logits = self.logits(digit, vq)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), vq.reshape(-1), label_smoothing=c.label_smoothing
        )
        acc = (logits.argmax(-1) == vq).float().mean()
        return loss, {"acc": float(acc)}

    @torch.inference_mode()
    def generate(
        self,
        digit_tokens: torch.Tensor,
        generators: list[torch.Generator],
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        batch_invariant: bool = False,
    ) -> torch.Tensor:
        """VQ token ids [B, M] for DiGIT tokens [B, N]; row b drawn with the next M uniforms of generators[b].

        Batched by default; batch_invariant as in GPT.generate: one row at a time, so results do not depend on
        the batch.
        """
        c = self.config
        digit_tokens = digit_tokens.to(self.digit_emb.weight.device)
        check_ids(digit_tokens, c.digit_len, c.digit_vocab_size, "digit_tokens")
        B = digit_tokens.shape[0]
        if len(generators) != B:
            raise ValueError(f"generate: {B} rows of digit_tokens but {len(generators)} generators")
        if batch_invariant and B > 1:
            return rowwise(
                lambda r: self.generate(
                    digit_tokens[r],
                    generators[r],
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    use_cache=use_cache,
                    batch_invariant=False,
                ),
                B,
            )
        was_training = self.training
        self.eval()
        uniforms = row_uniforms(generators, c.vq_len).to(digit_tokens.device)

        def pick(logits: torch.Tensor, i: int) -> torch.Tensor:
            logits = process_logits(logits.float(), temperature, top_k, top_p)
            return sample_with_uniforms(logits, uniforms[:, i], greedy=temperature == 0)

        aligned = self._aligned(digit_tokens)
        out = autoregress(
            self.trunk,
            self._prefix(digit_tokens, aligned),
            lambda ids, i: self._embed_vq(ids, i, aligned),
            self.head,
            pick,
            c.vq_len,
            use_cache,
        )
        self.train(was_training)
        return out


def load_renderer(directory: str | Path, map_location: str = "cpu") -> Renderer | NARRenderer:
    """The renderer of a checkpoint directory written with `checkpoint_meta()` (safetensors + JSON): a
    Renderer (kind "renderer") or a NARRenderer (kind "nar_renderer"). Both have the same `generate`."""
    from pipeline.models.nar_renderer import NAR_KIND, NARRenderer

    path = Path(directory) / CONFIG_FILE
    kind = read_json(path).get("kind") if path.is_file() else None
    if kind == NAR_KIND:
        build = lambda config: NARRenderer(RendererConfig(**config))  # noqa: E731
        return load_model(directory, NAR_KIND, build, map_location)
    if kind not in (None, "renderer"):
        raise CheckpointError(f"{path}: kind is {kind!r}, expected 'renderer' or {NAR_KIND!r}")
    return load_model(directory, "renderer", lambda config: Renderer(RendererConfig(**config)), map_location)
