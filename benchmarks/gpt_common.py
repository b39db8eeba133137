"""What the two GPT benchmarks share: the model-shape flags and the config they describe."""

from __future__ import annotations

import argparse

import torch

from pipeline.models.gpt import GPTConfig


def add_model_args(parser: argparse.ArgumentParser, dim: int) -> None:
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=dim)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    # One thread by default: on a shared 2-core machine, 2 torch threads competing with other processes
    # ran ~10x slower than 1 thread (spinning workers wait on descheduled peers).
    parser.add_argument("--threads", type=int, default=1)


def model_config(args: argparse.Namespace) -> GPTConfig:
    """The GPT of the flags (heads of width 64, FFN 4x), after setting torch's thread count."""
    torch.set_num_threads(args.threads)
    return GPTConfig(
        vocab_size=args.vocab,
        block_size=args.tokens,
        n_layer=args.layers,
        n_head=max(1, args.dim // 64),
        n_embd=args.dim,
        ffn_dim=4 * args.dim,
    )
