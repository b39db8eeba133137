"""Does SSL pretraining make the encoder's patch features discriminative? Random init vs the SSL objective.

Trains the pretrain_encoder config of params.yaml on the built-in data and prints, side by side for the random
initialisation (same seed, same architecture) and the pretrained encoder: weighted k-NN (k=20, T=0.07) and
linear-probe val accuracy of mean-pooled patch features at the tokenizer's layer (third from last) and the
last layer, plus pretraining images/s and minutes — all measured in this run.

    python benchmarks/ssl_probe.py                    # params.yaml's config, 4000 train / 1000 val images
    python benchmarks/ssl_probe.py --steps 20         # a quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.metrics.knn import knn_accuracy, mean_patch_features  # noqa: E402
from pipeline.ssl import (  # noqa: E402
    SSLConfig,
    build_ssl_model,
    generator_batches,
    image_batches,
    load_encoder,
    pretrain_encoder,
)
from pipeline.synthetic import generate_images  # noqa: E402
from stages.pretrain_encoder import ssl_config  # noqa: E402


def linear_probe(train: torch.Tensor, y: np.ndarray, val: torch.Tensor, yv: np.ndarray) -> float:
    scaler = StandardScaler().fit(train.numpy())
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(scaler.transform(train.numpy()), y)
    return float((clf.predict(scaler.transform(val.numpy())) == yv).mean())


def probe(vit: torch.nn.Module, cfg: SSLConfig, data: dict[str, np.ndarray], layer: int) -> dict[str, float]:
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2)
    xv = torch.from_numpy(data["xv"]).permute(0, 3, 1, 2)
    f = mean_patch_features(vit, x, cfg.mean, cfg.std, layer=layer)
    fv = mean_patch_features(vit, xv, cfg.mean, cfg.std, layer=layer)
    return {
        "knn": knn_accuracy(f, data["y"], fv, data["yv"]),
        "linear": linear_probe(f, data["y"], fv, data["yv"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-size", type=int, default=4000)
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument(
        "--steps", type=int, default=None, help="override SSLConfig.steps (default: the config's)"
    )
    ap.add_argument("--params", type=Path, default=Path("params.yaml"), help="its pretrain_encoder section")
    ap.add_argument("--config", type=str, default="{}", help="JSON overrides of SSLConfig fields")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    overrides = json.loads(args.config)
    if args.steps is not None:
        overrides["steps"] = args.steps
    base = ssl_config(load_params(args.params)).to_dict()
    cfg = SSLConfig.from_dict({**base, **overrides})
    t0 = time.perf_counter()
    x, y = generate_images(args.train_size, cfg.img_size, seed=0, num_classes=args.num_classes, split="train")
    xv, yv = generate_images(args.val_size, cfg.img_size, seed=0, num_classes=args.num_classes, split="val")
    data = {"x": x, "y": y, "xv": xv, "yv": yv}
    print(
        f"data: {len(x)} train / {len(xv)} val images, {args.num_classes} classes ({time.perf_counter() - t0:.1f} s)"
    )

    random_vit = build_ssl_model(cfg).export_backbone  # the initialisation pretraining starts from
    if cfg.fresh_images:  # the stage's stream for built-in data: new train-split images every step
        batches = generator_batches(cfg.img_size, 0, args.num_classes, cfg.batch_size)
    else:
        batches = image_batches(x, cfg.batch_size, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        _, summary = pretrain_encoder(batches, cfg, Path(tmp) / "run", Path(tmp) / "encoder", device="cpu")
        ssl_vit, meta = load_encoder(Path(tmp) / "encoder")

    layers = (-3, -1)
    results = {
        name: {layer: probe(vit, cfg, data, layer) for layer in layers}
        for name, vit in (("random", random_vit), ("ssl", ssl_vit))
    }
    print(
        f"\npretraining: {cfg.steps} steps x batch {cfg.batch_size} on {args.threads} threads: "
        f"{summary['images_per_s']:.1f} images/s, {summary['minutes']:.2f} min"
    )
    print(f"{'val accuracy':<28}{'random init':>12}{'SSL':>10}{'gain (pts)':>12}")
    for layer in layers:
        for metric in ("knn", "linear"):
            r, s = results["random"][layer][metric], results["ssl"][layer][metric]
            label = f"{'k-NN' if metric == 'knn' else 'linear'} (layer {layer})"
            print(f"{label:<28}{100 * r:>11.1f}%{100 * s:>9.1f}%{100 * (s - r):>+12.1f}")
    if args.out is not None:
        report = {
            "config": cfg.to_dict(),
            "images_per_s": summary["images_per_s"],
            "minutes": summary["minutes"],
            "threads": args.threads,
            "results": {n: {str(k): v for k, v in r.items()} for n, r in results.items()},
        }
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
