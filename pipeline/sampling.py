"""Logits processing and per-row random draws for autoregressive sampling.

Order applied by the models' `generate`: classifier-free guidance on the raw logits, then banned ids,
temperature, top-k, top-p, then one draw per row.

Reproducibility contract: same params (batch size included) give the same samples, and sample i's random
numbers depend only on (seed, i) and the model, never on the batch it was generated in or on the process
count. The pieces that make this hold:
  * `sample_seed(seed, i)` is a hash, so every sample has its own `torch.Generator`;
  * `row_uniforms` draws all of a row's float64 uniforms from that row's CPU generator in one call, before
    decoding starts (so a decode step does no per-row Python work), and `sample_with_uniforms` inverts each
    row's CDF in float64 — the draw is the same on any device and with any batch neighbours;
  * the logits themselves are batch-invariant only with `generate(..., batch_invariant=True)`, which computes
    every row on its own (see gpt.py): CPU GEMM and attention kernels pick different code paths for
    different batch sizes (measured here: a 1-token decode step differs in the last bits between batch 1, 2,
    3 and 16), and a last-bit change in a logit can flip a draw whose uniform falls next to a CDF boundary.
    The default, batched, is several times faster; its samples depend on the batch size too, which is a
    param.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (seed, sample index) or (seed, step, rank).

    A hash (not seed + i) so that neighbouring runs' seeds do not share streams: (0, 1) and (1, 0) differ.
    """
    text = ":".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def sample_seed(seed: int, i: int) -> int:
    """The seed of sample i of a run seeded with `seed`; independent of batch size and process count."""
    return derive_seed(seed, i)


def sample_generators(seed: int, indices: range | list[int]) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded with `sample_seed(seed, i)`."""
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: cond + (scale - 1) * (cond - uncond).

    This equals the usual uncond + scale * (cond - uncond); written from `cond` so that scale 1 returns the
    conditional logits bit for bit (and scale 0 the unconditional ones up to rounding).
    """
    if scale == 1.0:
        return cond
    return cond + (scale - 1.0) * (cond - uncond)


def top_k_mask(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Set every logit below the row's k-th largest to -inf. Ties with the k-th value are all kept.

    k None or 0 (or >= vocabulary) keeps everything.
    """
    if k is None or k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of highest-probability ids whose total mass reaches p.

    The most probable id is always kept. Probabilities are computed in float64; the sort is stable so equal
    logits are ordered by id and the result is deterministic. p None or >= 1 keeps everything.
    """
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    probs = torch.softmax(sorted_logits.double(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Temperature, then top-k, then top-p. Temperature 0 is handled by `sample_rows` (greedy)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return top_p_mask(top_k_mask(logits, top_k), top_p)


def row_uniforms(generators: list[torch.Generator], n: int) -> torch.Tensor:
    """float64 [B, n]: the next n uniforms in [0, 1) of each row's CPU generator (row b from generators[b])."""
    if n < 1:
        raise ValueError(f"row_uniforms: n must be >= 1, got {n}")
    return torch.stack([torch.rand(n, generator=g, dtype=torch.float64) for g in generators])


def sample_with_uniforms(logits: torch.Tensor, u: torch.Tensor, greedy: bool = False) -> torch.Tensor:
    """Draw one id per row of `logits` [B, V] by inverting the row's CDF at u [B] (float64 in [0, 1)).

    Inverse-CDF sampling in float64: pick the first id whose cumulative probability exceeds u * total. Ids with
    probability 0 (masked to -inf) are never picked. greedy takes the argmax (u is then unused, but callers still
    spend it, so a row's stream does not depend on the settings).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_rows expects logits [B, V], got shape {tuple(logits.shape)}")
    if u.shape != (logits.shape[0],):
        raise ValueError(f"sample_rows: {logits.shape[0]} rows but {tuple(u.shape)} uniforms")
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.double(), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    bad = ~torch.isfinite(cdf[:, -1])
    if bool(bad.any()):
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(
            f"sample_rows: rows {rows} have no valid distribution (NaN logits, or every id masked)"
        )
    target = (u.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(-1)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return ids.clamp_(max=logits.shape[-1] - 1)


def sample_rows(
    logits: torch.Tensor, generators: list[torch.Generator], greedy: bool = False
) -> torch.Tensor:
    """Draw one id per row of `logits` [B, V], row b with the next uniform of generators[b] (CPU generators).

    Each row consumes exactly one draw per call, also when greedy, so a row's stream does not depend on the
    settings of other rows. The models' decode loops draw all steps' uniforms at once (`row_uniforms`) instead.
    """
    if len(generators) != logits.shape[0]:
        raise ValueError(f"sample_rows: {logits.shape[0]} rows but {len(generators)} generators")
    return sample_with_uniforms(logits, row_uniforms(generators, 1)[:, 0], greedy)
