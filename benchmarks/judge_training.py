"""Training the FID/IS judge on the built-in data through the shared loop: val top-1 vs steps, images/s and
CPU seconds, all measured in this run.

One run of the train_judge defaults (one cosine schedule); every `--every` steps the model's val top-1 is
measured from inside the loop (after_optimizer_step), and that evaluation time is excluded from the training
figures. Feature extraction (what FID/IS cost per image) is measured on the val set as the baseline the
training throughput is compared with.

    python benchmarks/judge_training.py [--steps 1800] [--batch 32] [--widths 16,32,64,128] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.models.judge import Judge, JudgeConfig, evaluate_accuracy, judge_batches, to_judge_input
from pipeline.shards import write_shard
from pipeline.stream import ShardStream
from pipeline.synthetic import generate_images
from pipeline.train import TrainConfig, fit


class TimedJudge(Judge):
    """The judge, plus a val-accuracy probe every `every` steps whose cost is kept apart."""

    def __init__(self, config: JudgeConfig, val: tuple[torch.Tensor, torch.Tensor], every: int, steps: int):
        super().__init__(config)
        self.val, self.every, self.steps = val, every, steps
        self.curve: list[tuple[int, float, float, float]] = []  # (steps done, val top-1, wall s, cpu s)
        self.eval_wall = self.eval_cpu = 0.0
        self.start_wall, self.start_cpu = time.perf_counter(), time.process_time()

    def after_optimizer_step(self, step: int) -> None:
        done = step + 1
        if done % self.every and done != self.steps:
            return
        wall, cpu = time.perf_counter(), time.process_time()
        acc = evaluate_accuracy(self, *self.val)
        self.eval_wall += time.perf_counter() - wall
        self.eval_cpu += time.process_time() - cpu
        train_wall = time.perf_counter() - self.start_wall - self.eval_wall
        train_cpu = time.process_time() - self.start_cpu - self.eval_cpu
        self.curve.append((done, acc, train_wall, train_cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=4000, help="train images (prepare.train_size)")
    parser.add_argument("--val", type=int, default=1000, help="val images (prepare.val_size)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1800)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--widths", default="16,32,64,128")
    parser.add_argument("--every", type=int, default=300, help="steps between val measurements")
    # One thread by default: this machine's 2 cores are shared, and competing torch threads spin-wait.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    t = time.perf_counter()
    x_train, y_train = generate_images(args.train, args.size, 0, 10, "train")
    x_val, y_val = generate_images(args.val, args.size, 0, 10, "val")
    val = (torch.from_numpy(x_val).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y_val).long())
    print(
        f"data: {args.train} train + {args.val} val images of {args.size}px in {time.perf_counter() - t:.1f}s"
    )

    cfg = JudgeConfig(
        num_classes=10, image_size=args.size, widths=tuple(int(w) for w in args.widths.split(","))
    )
    torch.manual_seed(0)
    model = TimedJudge(cfg, val, args.every, args.steps)
    n_params = sum(p.numel() for p in model.parameters())
    # the train_judge defaults (params.yaml train_judge.train)
    train = TrainConfig(
        steps=args.steps,
        lr=args.lr,
        warmup_steps=20,
        schedule="cosine",
        min_lr_ratio=0.0,
        weight_decay=0.05,
        betas=(0.9, 0.999),
        grad_clip=1.0,
        checkpoint_every=10**9,
        log_every=10**9,
        seed=0,
        device="cpu",
    )
    shard_dir = tempfile.TemporaryDirectory()
    for i, start in enumerate(range(0, args.train, 1000)):
        rows = range(start, min(start + 1000, args.train))
        samples = ((f"train_{j:07d}", {"png": x_train[j], "cls": int(y_train[j])}) for j in rows)
        write_shard(Path(shard_dir.name) / f"train-{i:05d}.tar", samples)
    stream = ShardStream(
        sorted(Path(shard_dir.name).glob("train-*.tar")), {"image": "png", "label": "cls"}, args.batch, seed=0
    )
    batches = judge_batches(stream, args.size, seed=0)
    print(
        f"judge widths {cfg.widths}, {n_params / 1e3:.0f}k params; {args.steps} steps x {args.batch}; "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"
    )
    with tempfile.TemporaryDirectory() as run:
        model.start_wall, model.start_cpu = time.perf_counter(), time.process_time()
        fit(model, batches, train, Path(run), {"kind": "judge", "config": asdict(cfg)}, progress=False)
    shard_dir.cleanup()

    print(
        f"{'steps':>6} {'images':>8} {'val top-1':>9} {'wall s':>7} {'CPU s':>7} {'img/s wall':>10} {'img/s CPU':>9}"
    )
    for done, acc, wall, cpu in model.curve:
        images = done * args.batch
        print(
            f"{done:6d} {images:8d} {acc:9.3f} {wall:7.1f} {cpu:7.1f} {images / wall:10.0f} {images / cpu:9.0f}"
        )

    # Baseline: the judge's feature extraction (eval mode, batch 100), what each FID/IS image costs.
    model.eval()
    with torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(val[0]), 100):
            model.logits(to_judge_input(val[0][i : i + 100], args.size))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    done, acc, train_wall, train_cpu = model.curve[-1]
    train_rate = done * args.batch / train_cpu
    print(
        f"feature extraction: {len(val[0]) / wall:.0f} img/s wall, {len(val[0]) / cpu:.0f} img/s CPU; "
        f"a training image costs {len(val[0]) / cpu / train_rate:.1f}x an extracted one (CPU time)"
    )
    print(f"final: val top-1 {acc:.3f} after {train_cpu:.1f} CPU s ({train_wall:.1f} s wall) of training")


if __name__ == "__main__":
    main()
