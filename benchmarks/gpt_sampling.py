"""Sampling throughput of the stage-1 GPT: KV cache vs recomputing the whole prefix at every token.

Same model, same seeds, 256-token sequences; prints tokens/s of both and their ratio, all measured in this
run, plus the one-row-at-a-time (batch-invariant) mode the pipeline uses by default. Also checks that the
cached and the recomputing runs drew the same tokens.

    python benchmarks/gpt_sampling.py [--layers 4] [--dim 256] [--tokens 256] [--batch 8] [--threads 1]

The recomputing baseline costs O(tokens^2): about 45 s on one shared CPU core at the defaults.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from gpt_common import add_model_args, model_config

from pipeline.models.gpt import GPT
from pipeline.sampling import sample_generators


def timed_generate(model: GPT, batch: int, **kwargs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = model.generate(sample_generators(0, range(batch)), **kwargs)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, dim=256)
    parser.add_argument("--top-k", type=int, default=200)
    args = parser.parse_args()
    cfg = model_config(args)
    model = GPT(cfg, seed=0).eval()
    n = args.batch * args.tokens
    print(
        f"GPT {args.layers} layers, d={args.dim}, {model.num_params() / 1e6:.1f}M params, vocab {args.vocab}; "
        f"{args.batch} sequences x {args.tokens} tokens; torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    model.generate(sample_generators(0, range(1)), n_tokens=8)  # warm-up

    kw = {"top_k": args.top_k, "batch_invariant": False}
    cached, t_cache = timed_generate(model, args.batch, use_cache=True, **kw)
    naive, t_naive = timed_generate(model, args.batch, use_cache=False, **kw)
    _, t_rows = timed_generate(model, args.batch, use_cache=True, top_k=args.top_k, batch_invariant=True)

    print(f"KV cache, batched:            {n / t_cache:9.1f} tokens/s  ({t_cache:.2f} s)")
    print(f"recompute prefix, batched:    {n / t_naive:9.1f} tokens/s  ({t_naive:.2f} s)")
    print(
        f"KV cache, one row at a time:  {n / t_rows:9.1f} tokens/s  ({t_rows:.2f} s)  [batch_invariant=True]"
    )
    print(f"speed-up of the KV cache: {t_naive / t_cache:.1f}x (goal >= 10x)")
    print(f"cost of batch invariance: {t_rows / t_cache:.1f}x slower than batched")
    print(f"cached and recomputed samples identical: {torch.equal(cached, naive)}")


if __name__ == "__main__":
    main()
