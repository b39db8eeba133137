"""Train the pixel VQ tokenizer on the built-in synthetic images and report what it buys.

Prints, all measured in this run: training throughput (images/s), wall time, and on held-out images the
PSNR of the untrained model, of the trained model, and of two codebook-free references at the same token
grid (an h x w thumbnail upsampled nearest / bilinear: what h*w*3 *continuous* numbers give), plus
codebook usage and perplexity.

    python benchmarks/vq.py                      # the default config: 500 steps x 16 images
    python benchmarks/vq.py --steps 300 --threads 2 --set channels=32 --set codebook_size=256
"""

from __future__ import annotations

import argparse
import ast
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.models.vq import VQConfig, VQModel, codebook_usage, psnr, vq_meta
from pipeline.synthetic import generate_images
from pipeline.train import TrainConfig, fit


def to_tensor(images) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--val-images", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--set", action="append", default=[], help="VQConfig override key=value (repeatable)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    cfg = VQConfig(**overrides)
    model = VQModel(cfg)
    n_params = sum(p.numel() for p in model.parameters())

    t0 = time.perf_counter()
    train_np, _ = generate_images(args.train_images, args.image_size, seed=0, split="train")
    val_np, _ = generate_images(args.val_images, args.image_size, seed=0, split="val")
    train_x, val_x = to_tensor(train_np), to_tensor(val_np)
    print(f"data: {len(train_x)} train / {len(val_x)} val images in {time.perf_counter() - t0:.1f} s")

    h, w = model.token_shape(args.image_size, args.image_size)
    thumb = F.adaptive_avg_pool2d(val_x, (h, w))
    ref_nearest = float(psnr(F.interpolate(thumb, size=val_x.shape[-2:], mode="nearest"), val_x))
    ref_bilinear = float(psnr(F.interpolate(thumb, size=val_x.shape[-2:], mode="bilinear"), val_x))
    model.eval()
    untrained = float(psnr(model.reconstruct(val_x), val_x))

    def batches(start: int):
        step = start
        while True:
            g = torch.Generator().manual_seed(step)
            yield {"image": train_x[torch.randint(0, len(train_x), (args.batch,), generator=g)]}
            step += 1

    tcfg = TrainConfig(
        steps=args.steps, lr=args.lr, warmup_steps=min(20, args.steps // 10), weight_decay=0.0, device="cpu"
    )
    with tempfile.TemporaryDirectory() as tmp:
        summary = fit(model, batches, tcfg, Path(tmp) / "run", vq_meta(cfg), Path(tmp) / "curves")
    model.eval()
    ids = model.encode(val_x)
    trained = float(psnr(model.decode(ids), val_x))
    usage, perplexity = codebook_usage(ids, cfg.codebook_size)

    print(f"config: {asdict(cfg)}  params {n_params / 1e6:.2f}M  threads {torch.get_num_threads()}")
    print(f"tokens: {args.image_size}x{args.image_size} -> {h}x{w}, codebook {cfg.codebook_size}")
    print(
        f"training: {args.steps} steps x {args.batch} images in {summary['seconds']:.1f} s "
        f"({summary['items_per_s']:.1f} images/s)"
    )
    print(f"val PSNR untrained      : {untrained:6.2f} dB")
    print(f"val PSNR trained        : {trained:6.2f} dB  ({trained - untrained:+.2f} dB vs untrained)")
    print(f"ref {h}x{w} thumb nearest : {ref_nearest:6.2f} dB  (continuous colours, no codebook)")
    print(f"ref {h}x{w} thumb bilinear: {ref_bilinear:6.2f} dB")
    print(f"val codebook usage {usage:.3f}, perplexity {perplexity:.1f} of {cfg.codebook_size}")


if __name__ == "__main__":
    main()
