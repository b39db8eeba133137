"""Sampling throughput of the stage-1 GPT and the stage-2 renderer, every mode measured in this run.

Modes, same model and seeds:
  batched      the default: prefill + preallocated KV cache, CFG rows in the same batch, all of a row's
               uniforms drawn before decoding (no per-step work per row)
  per-step     the batched path as it was before: one draw per row and step from that row's generator
               (a Python loop over the batch at every token); kept here as the baseline
  one-row      batch_invariant=True: every row decoded on its own (identical for any batch size)
  recompute    no KV cache: the whole prefix recomputed at every token (O(tokens^2); batch 16 only)

Prints tokens/s per mode at each batch size, with and without classifier-free guidance (CFG doubles the
rows the trunk runs), and the speed-ups against per-step and one-row. Also checks that batched and
per-step draw the same tokens (they spend the same uniforms), and that batched and recompute agree.

    python benchmarks/gpt_sampling.py [--batches 16 64] [--tokens 256] [--threads 1] [--skip-slow]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from gpt_common import add_model_args, model_config

from pipeline.models.gpt import GPT, autoregress
from pipeline.models.renderer import Renderer, RendererConfig
from pipeline.sampling import cfg_combine, process_logits, sample_generators, sample_rows


@torch.inference_mode()
def per_step_generate(model: GPT, gens: list[torch.Generator], labels, top_k: int, cfg_scale: float):
    """The pre-change batched GPT decode: the same loop, but each step draws one uniform per row."""
    B, device = len(gens), model.wte.weight.device
    first = model._first_ids(labels, B, device)
    if cfg_scale != 1.0:
        first = torch.cat([first, torch.full_like(first, model.null_class)])
    prefix = model._embed_sequence(first, first.new_zeros(first.shape[0], 0))

    def embed(ids, i):
        return model.wte(ids) + model.wpe(torch.arange(i + 1, i + 1 + ids.shape[1], device=device))

    def pick(logits, i):
        logits = logits.float()
        if cfg_scale != 1.0:
            logits = cfg_combine(logits[:B], logits[B:], cfg_scale)
        return sample_rows(process_logits(logits, 1.0, top_k, None), gens)

    return autoregress(model.trunk, prefix, embed, model.head, pick, model.config.block_size)


@torch.inference_mode()
def per_step_render(model: Renderer, digit: torch.Tensor, gens: list[torch.Generator], top_p: float):
    aligned = model._aligned(digit)

    def pick(logits, i):
        return sample_rows(process_logits(logits.float(), 1.0, None, top_p), gens)

    return autoregress(
        model.trunk,
        model._prefix(digit, aligned),
        lambda ids, i: model._embed_vq(ids, i, aligned),
        model.head,
        pick,
        model.config.vq_len,
    )


def timed(fn: Callable[..., torch.Tensor], *args, **kwargs) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def report(name: str, results: dict[str, tuple[torch.Tensor, float]], n_tokens: int) -> None:
    for mode, (_, seconds) in results.items():
        print(f"  {name:<22} {mode:<10} {n_tokens / seconds:9.1f} tokens/s  ({seconds:6.2f} s)")
    base = results["batched"][1]
    ratios = [f"{results[m][1] / base:.1f}x vs {m}" for m in ("per-step", "one-row") if m in results]
    print(f"  {name:<22} batched is {', '.join(ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser, dim=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--top-p", type=float, default=0.8, help="renderer nucleus")
    parser.add_argument("--skip-slow", action="store_true", help="no one-row and recompute modes")
    args = parser.parse_args()
    cfg = model_config(args)
    cfg.num_classes = args.classes
    gpt = GPT(cfg, seed=0).eval()
    rcfg = RendererConfig(
        digit_vocab_size=args.vocab,
        vq_vocab_size=args.vocab,
        digit_len=args.tokens,
        vq_len=args.tokens,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_embd=cfg.n_embd,
        ffn_dim=cfg.ffn_dim,
    )
    renderer = Renderer(rcfg, seed=0).eval()
    print(
        f"GPT and renderer: {args.layers} layers, d={args.dim}, vocab {args.vocab}, {args.tokens} tokens "
        f"(renderer: {args.tokens} DiGIT + {args.tokens} VQ); {gpt.num_params() / 1e6:.1f}M GPT params; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    gpt.generate(sample_generators(0, range(2)), n_tokens=8)  # warm-up

    for batch in args.batches:
        n = batch * args.tokens
        labels = torch.arange(batch) % args.classes

        def gens(batch: int = batch) -> list[torch.Generator]:
            return sample_generators(0, range(batch))

        for cfg_scale in (1.0, 2.0):
            kw = {"labels": labels, "top_k": args.top_k, "cfg_scale": cfg_scale}
            res = {
                "batched": timed(gpt.generate, gens(), **kw),
                "per-step": timed(per_step_generate, gpt, gens(), **kw),
            }
            if not args.skip_slow:
                res["one-row"] = timed(gpt.generate, gens(), batch_invariant=True, **kw)
                if batch == min(args.batches) and cfg_scale == 1.0:
                    res["recompute"] = timed(gpt.generate, gens(), use_cache=False, **kw)
            rows = batch * (2 if cfg_scale != 1 else 1)
            print(f"GPT, batch {batch}, CFG {cfg_scale:g} ({rows} trunk rows)")
            report("GPT", res, n)
            print(
                f"  batched and per-step drew the same tokens: {torch.equal(res['batched'][0], res['per-step'][0])}"
            )
            if "recompute" in res:
                same = torch.equal(res["batched"][0], res["recompute"][0])
                print(f"  batched and recompute drew the same tokens: {same}")

        digit = torch.randint(0, args.vocab, (batch, args.tokens), generator=torch.Generator().manual_seed(1))
        res = {
            "batched": timed(renderer.generate, digit, gens(), top_p=args.top_p),
            "per-step": timed(per_step_render, renderer, digit, gens(), args.top_p),
        }
        if not args.skip_slow:
            res["one-row"] = timed(renderer.generate, digit, gens(), top_p=args.top_p, batch_invariant=True)
        print(f"renderer, batch {batch}")
        report("renderer", res, n)
        print(
            f"  batched and per-step drew the same tokens: {torch.equal(res['batched'][0], res['per-step'][0])}"
        )


if __name__ == "__main__":
    main()
