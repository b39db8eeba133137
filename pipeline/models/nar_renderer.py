"""Stage-2 renderer, non-autoregressive (MaskGIT-style): DiGIT tokens of an image -> its pixel VQ tokens in a
few parallel steps. The paper's "DiGIT + MaskGIT" rows; the reference is DiGIT's
fairseq_user/image_generation_stage2/model_nar.py with config/stage2/dino_base_nar.yaml and
scripts/infer_stage2_nar.sh, itself a port of google-research/maskgit (maskgit/libml/parallel_decode.py,
mask_schedule.py).

Model: the same trunk as every other transformer here (gpt.py's Transformer), bidirectional, pre-LN like the
reference. Input [s1 .. sN (DiGIT tokens), v1 .. vM (VQ tokens, some replaced by MASK)], each segment with its
own token and position tables; the outputs at the VQ positions predict the VQ tokens. (The reference puts an
EOS between the segments; with separate position tables and no causal order it carries no information.)
`aligned` adds the DiGIT token at each VQ token's image location, as in the AR renderer.

Training (model_nar.py random_mask): per row u ~ U[0, 1), n = min(M, floor(M·cos(πu/2)) + 1) VQ tokens chosen
uniformly at random are masked; cross-entropy (label-smoothed) on the masked positions only. The loss is the
sum over masked positions divided by B·E[n] (E[n] exact, `expected_train_mask_count`) rather than by the
realised count: the per-token weighting of the reference's token mean, but a mean over rows, so gradient
accumulation and DDP give exactly the big batch's gradient (the realised count of a micro-batch is not the
batch's).

Decoding (model_nar.py forward_decoder, maskgit parallel_decode.py): start with every VQ token masked; at step
t of T, sample every masked position (temperature, top-k, top-p as for the AR renderer), keep the known ones;
unless t is the last step, re-mask the n_t least confident of the newly sampled tokens, n_t =
floor(M·cos(π/2·(t+1)/T)) clamped to [1, still-masked − 1], confidence = log p(sampled) +
choice_temperature·(1 − (t+1)/T)·Gumbel. So after T steps every position is filled. Defaults: T = 8
(infer_stage2_nar.sh --iter-decode-max-iter 8), choice temperature 4.5 (model_nar.py).

Random numbers: each row draws its 2·T·M float64 uniforms (T·M for the token draws, T·M for the Gumbel
noise) from its own generator before decoding, so row b depends only on generators[b] (and, batched, on the
batch composition through the kernels; `batch_invariant` computes one row at a time, as in the AR renderer).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.gpt import Transformer, embed_scale, init_model, rowwise
from pipeline.models.renderer import RendererConfig, aligned_index, check_ids
from pipeline.sampling import process_logits, row_uniforms, sample_with_uniforms

NAR_KIND = "nar_renderer"  # checkpoint kind (config.json)
DEFAULT_STEPS = 8  # DiGIT scripts/infer_stage2_nar.sh: --iter-decode-max-iter 8
DEFAULT_CHOICE_TEMPERATURE = 4.5  # DiGIT model_nar.py forward_decoder: choice_temperature = 4.5


def train_mask_counts(length: int, u: torch.Tensor) -> torch.Tensor:
    """Tokens masked per training row for uniforms u in [0, 1): min(L, floor(L·cos(πu/2)) + 1) — at least one,
    all of them as u -> 0 (model_nar.py random_mask). Computed in float64 so it does not depend on the device."""
    n = torch.floor(length * torch.cos(u.double() * (math.pi / 2))).long() + 1
    return n.clamp_(max=length)


def expected_train_mask_count(length: int) -> float:
    """E[train_mask_counts(L, u)] for u ~ U[0, 1), exactly: P(n >= k) = P(cos(πu/2) >= (k-1)/L) =
    (2/π)·arccos((k-1)/L), summed over k = 1..L."""
    return sum(2 / math.pi * math.acos(j / length) for j in range(length))


def decode_mask_counts(length: int, steps: int) -> list[int]:
    """Tokens still masked after each of the `steps` decoding steps, starting from `length` masked: step t
    (0-based) leaves floor(L·cos(π/2·(t+1)/T)) clamped to [1, masked before − 1]; the last step leaves 0."""
    if steps < 1 or length < 1:
        raise ValueError(f"decode_mask_counts: expected length >= 1 and steps >= 1, got {length}, {steps}")
    out, masked = [], length
    for t in range(steps - 1):
        n = math.floor(length * math.cos(math.pi / 2 * (t + 1) / steps))
        masked = max(1, min(masked - 1, n))
        out.append(masked)
    return [*out, 0]


class NARRenderer(nn.Module):
    def __init__(self, config: RendererConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        c = config
        self.digit_emb = nn.Embedding(c.digit_vocab_size, c.n_embd)
        self.digit_pos = nn.Embedding(c.digit_len, c.n_embd)
        self.vq_emb = nn.Embedding(c.vq_vocab_size + 1, c.n_embd)  # last row: MASK
        self.vq_pos = nn.Embedding(c.vq_len, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.trunk = Transformer(
            c.n_layer, c.n_head, c.n_embd, c.ffn_dim, c.dropout, c.bias, c.norm, c.attn_dropout, causal=False
        )
        self.head = nn.Linear(c.n_embd, c.vq_vocab_size, bias=False)
        if c.aligned:
            self.aligned_emb = nn.Embedding(c.digit_vocab_size, c.n_embd)
            self.register_buffer("align_index", aligned_index(c.digit_grid, c.vq_grid), persistent=False)
        self.embed_scale = embed_scale(c.norm, c.n_embd)
        self.expected_masked = expected_train_mask_count(c.vq_len)
        init_model(self, c.norm, c.n_layer, torch.Generator().manual_seed(seed))

    @property
    def mask_id(self) -> int:
        return self.config.vq_vocab_size

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint_meta(self) -> dict:
        return {"kind": NAR_KIND, "config": asdict(self.config)}

    def logits(self, digit: torch.Tensor, vq_in: torch.Tensor) -> torch.Tensor:
        """[B, M, V]: predictions for every VQ position given DiGIT tokens [B, N] and VQ inputs [B, M] (ids in
        [0, V]; V = MASK), every position seeing every other."""
        device = digit.device
        s = self.embed_scale
        x_digit = self.digit_emb(digit) * s + self.digit_pos(torch.arange(digit.shape[1], device=device))
        x_vq = self.vq_emb(vq_in) * s + self.vq_pos(torch.arange(vq_in.shape[1], device=device))
        if self.config.aligned:
            x_vq = x_vq + self.aligned_emb(digit[:, self.align_index]) * s
        h = self.trunk(self.drop(torch.cat([x_digit, x_vq], dim=1)))
        return self.head(h[:, self.config.digit_len :])

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """batch {"digit": [B, N] long, "vq": [B, M] long} -> (masked-token CE, {"acc", "mask_ratio"}).

        Masks are drawn from the global torch RNG in training (fit seeds it per step) and from a fixed-seed
        generator in eval mode, so the validation loss of a checkpoint is deterministic."""
        c = self.config
        digit, vq = batch["digit"], batch["vq"]
        check_ids(digit, c.digit_len, c.digit_vocab_size, "batch['digit']")
        check_ids(vq, c.vq_len, c.vq_vocab_size, "batch['vq']")
        B, M = vq.shape
        if digit.shape[0] != B:
            raise ValueError(f"batch: digit has {digit.shape[0]} rows but vq has {B}")
        gen = None if self.training else torch.Generator().manual_seed(0)
        where = vq.device if gen is None else torch.device("cpu")  # a seeded generator lives on the CPU
        u = torch.rand(B, generator=gen, device=where)
        scores = torch.rand(B, M, generator=gen, device=where)
        n = train_mask_counts(M, u).to(vq.device)
        # the n lowest-scoring positions of each row: a uniformly random subset of size n
        masked = scores.to(vq.device).argsort(dim=1).argsort(dim=1) < n[:, None]
        logits = self.logits(digit, vq.masked_fill(masked, self.mask_id))
        ce = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            vq.reshape(-1),
            label_smoothing=c.label_smoothing,
            reduction="none",
        ).view(B, M)
        loss = (ce * masked).sum() / (B * self.expected_masked)
        acc = (logits.argmax(-1) == vq)[masked].float().mean()
        return loss, {"acc": float(acc), "mask_ratio": float(masked.float().mean())}

    @torch.inference_mode()
    def generate(
        self,
        digit_tokens: torch.Tensor,
        generators: list[torch.Generator],
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        batch_invariant: bool = False,
        steps: int = DEFAULT_STEPS,
        choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE,
    ) -> torch.Tensor:
        """VQ token ids [B, M] for DiGIT tokens [B, N] in `steps` parallel decoding steps (module docstring);
        row b draws its 2·steps·M uniforms from generators[b]. The interface of Renderer.generate, plus the
        number of steps and the choice temperature (0: re-mask exactly the least probable tokens)."""
        c = self.config
        digit_tokens = digit_tokens.to(self.digit_emb.weight.device)
        check_ids(digit_tokens, c.digit_len, c.digit_vocab_size, "digit_tokens")
        B, M = digit_tokens.shape[0], c.vq_len
        if len(generators) != B:
            raise ValueError(f"generate: {B} rows of digit_tokens but {len(generators)} generators")
        if steps < 1:
            raise ValueError(f"generate: steps must be >= 1, got {steps}")
        if choice_temperature < 0:
            raise ValueError(f"generate: choice_temperature must be >= 0, got {choice_temperature}")
        if batch_invariant and B > 1:
            return rowwise(
                lambda r: self.generate(
                    digit_tokens[r],
                    generators[r],
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    batch_invariant=False,
                    steps=steps,
                    choice_temperature=choice_temperature,
                ),
                B,
            )
        was_training = self.training
        self.eval()
        device = digit_tokens.device
        uniforms = row_uniforms(generators, 2 * steps * M).view(B, 2, steps, M).to(device)
        ids = torch.full((B, M), self.mask_id, dtype=torch.long, device=device)
        unknown = torch.ones(B, M, dtype=torch.bool, device=device)
        positions = torch.arange(M, device=device).expand(B, M)
        for t in range(steps):
            logits = self.logits(digit_tokens, ids).float()  # [B, M, V]
            flat = process_logits(logits.reshape(B * M, -1), temperature, top_k, top_p)
            sampled = sample_with_uniforms(flat, uniforms[:, 0, t].reshape(-1), greedy=temperature == 0).view(
                B, M
            )
            ids = torch.where(unknown, sampled, ids)
            if t + 1 == steps:
                break
            ratio = (t + 1) / steps
            keep_masked = math.floor(M * math.cos(math.pi / 2 * ratio))
            n_mask = unknown.sum(dim=1).sub(1).clamp(max=keep_masked).clamp(min=1)  # [B]
            # confidence of the model's own (unfiltered) distribution in the sampled id, as the reference
            confidence = torch.log_softmax(logits.double(), dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            noise_scale = choice_temperature * (1.0 - ratio)
            if noise_scale > 0:
                u = uniforms[:, 1, t].clamp(min=torch.finfo(torch.float64).tiny)
                confidence = confidence + noise_scale * -torch.log(-torch.log(u))
            confidence = confidence.masked_fill(~unknown, math.inf)  # known tokens are never re-masked
            order = confidence.argsort(dim=1, stable=True)
            rank = torch.empty_like(order).scatter_(1, order, positions)
            unknown = rank < n_mask[:, None]
            ids = ids.masked_fill(unknown, self.mask_id)
        self.train(was_training)
        return ids
