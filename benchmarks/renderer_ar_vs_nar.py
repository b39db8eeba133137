"""Stage-2 sampling time per image: the AR renderer (KV cache, M sequential steps) against the NAR renderer
(MaskGIT-style: T parallel steps over all N + M positions, no cache), same trunk size, same DiGIT tokens,
both measured in this run.

The AR renderer runs N + M trunk positions once (a prefill of N + 1, then M - 1 one-token steps); the NAR one
runs T passes over N + M positions, so it does T x the arithmetic in T instead of M sequential steps. Which
wins depends on how well the hardware fills with one-token steps (batch size): the figures say.

    python benchmarks/renderer_ar_vs_nar.py [--tokens 64] [--layers 4] [--dim 192] [--batches 1 50] \\
        [--steps 4 8 16] [--threads 1] [--repeats 3]

Defaults: the demo's renderer (4 layers, d 192, 8x8 DiGIT and 8x8 VQ tokens, K 256, V 512).
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.models.nar_renderer import NARRenderer
from pipeline.models.renderer import Renderer, RendererConfig
from pipeline.sampling import sample_generators


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="N = M tokens per image")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--digit-vocab", type=int, default=256)
    ap.add_argument("--vq-vocab", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 50])
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--top-p", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = RendererConfig(
        digit_vocab_size=args.digit_vocab,
        vq_vocab_size=args.vq_vocab,
        digit_len=args.tokens,
        vq_len=args.tokens,
        n_layer=args.layers,
        n_head=args.heads,
        n_embd=args.dim,
        ffn_dim=4 * args.dim,
    )
    ar, nar = Renderer(cfg).eval(), NARRenderer(cfg).eval()
    print(
        f"renderer {args.layers} layers, d {args.dim}, N = M = {args.tokens}, K {args.digit_vocab}, "
        f"V {args.vq_vocab}; {torch.get_num_threads()} thread(s); best of {args.repeats}"
    )
    for batch in args.batches:
        time_batch(ar, nar, batch, args)


def time_batch(ar: Renderer, nar: NARRenderer, batch: int, args: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(batch)
    digit = torch.randint(0, args.digit_vocab, (batch, args.tokens), generator=g)

    def gens() -> list[torch.Generator]:
        return sample_generators(0, range(batch))

    t_ar = best_of(lambda: ar.generate(digit, gens(), top_p=args.top_p), args.repeats)
    print(f"batch {batch}: AR  {1e3 * t_ar / batch:8.2f} ms/image  ({args.tokens} sequential steps)")
    for steps in args.steps:
        t = best_of(lambda s=steps: nar.generate(digit, gens(), top_p=args.top_p, steps=s), args.repeats)
        print(
            f"batch {batch}: NAR {1e3 * t / batch:8.2f} ms/image  ({steps} steps; AR / NAR time "
            f"{t_ar / t:5.2f}x; trunk positions {steps * 2 * args.tokens} vs {2 * args.tokens})"
        )


if __name__ == "__main__":
    main()
