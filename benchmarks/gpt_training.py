"""Training throughput of the stage-1 GPT through the shared loop (pipeline.train.fit), as a fraction of
this machine's matmul peak measured in the same run.

Model FLOPs per step = 6 * (matmul parameters) * tokens + 12 * layers * d * T * tokens (attention scores
and values, forward + backward, counted over the full T x T square as in PaLM's MFU; a causal kernel skips
about half). Embedding lookups are not matmuls and are not counted; the output head is.
The peak is the best of square torch.mm products (fp32, and bf16 for the bf16-autocast run).

    python benchmarks/gpt_training.py [--layers 4] [--dim 512] [--tokens 256] [--batch 8] [--steps 6]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gpt_common import add_model_args, model_config

from pipeline.live import read_curves
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.train import TrainConfig, fit


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048), repeats: int = 3) -> float:
    """Best FLOP/s of an n x n x n torch.mm over a few sizes."""
    best = 0.0
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
        torch.mm(a, b)  # warm-up (oneDNN primitive creation)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def train_step_seconds(cfg: GPTConfig, batch: int, steps: int, amp: str) -> float:
    """Median seconds per optimizer step of fit(), skipping the first two (allocation, kernel set-up)."""
    model = GPT(cfg, seed=0)

    def batches(start: int):
        for step in itertools.count(start):
            g = torch.Generator().manual_seed(step)
            yield {"tokens": torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g)}

    with tempfile.TemporaryDirectory() as tmp:
        curves = Path(tmp) / "curves"
        train = TrainConfig(steps=steps, lr=1e-4, device="cpu", amp=amp, checkpoint_every=10**9)
        fit(model, batches, train, Path(tmp) / "run", {"kind": "gpt"}, curves, progress=False)
        seconds = [float(r["seconds"]) for r in read_curves(curves)]
    return statistics.median(seconds[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, dim=512)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    cfg = model_config(args)
    model = GPT(cfg)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "trunk" in n)
    matmul_params += model.head.weight.numel()
    tokens = args.batch * args.tokens
    flops = 6 * matmul_params * tokens + 12 * args.layers * args.dim * args.tokens * tokens
    print(
        f"GPT {args.layers} layers, d={args.dim}, {model.num_params() / 1e6:.1f}M params "
        f"({matmul_params / 1e6:.1f}M in matmuls); batch {args.batch} x {args.tokens} tokens; "
        f"{flops / 1e9:.1f} GFLOP per step; torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for name, dtype, amp in (("fp32", torch.float32, "off"), ("bf16 autocast", torch.bfloat16, "bf16")):
        peak = matmul_peak(dtype)
        step = train_step_seconds(cfg, args.batch, args.steps, amp)
        achieved = flops / step
        print(
            f"{name:14s} matmul peak {peak / 1e9:7.1f} GFLOP/s | training {tokens / step:8.1f} tokens/s, "
            f"{achieved / 1e9:6.1f} GFLOP/s = {achieved / peak:5.1%} of peak (goal >= 50%)"
        )


if __name__ == "__main__":
    main()
