"""Throughput of `prepare`: built-in generation vs ImageFolder ingest (decode + convert + resize + PNG).

    python benchmarks/prepare.py [--n 1000] [--src-size 256]

Both paths write real shards through the same per-shard job the stage uses; figures are images/s
measured in this run, plus their ratio.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image

from pipeline.config import Params, with_overrides
from pipeline.prepare import plan, run_job
from pipeline.synthetic import generate_images


def _time_jobs(params: Params, out: Path) -> tuple[int, float]:
    p = plan(params)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    n = sum(len(run_job(job, out).rows) for job in p.jobs)
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="images per path")
    ap.add_argument(
        "--src-size", type=int, default=256, help="side of the source JPEGs for ImageFolder ingest"
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builtin = with_overrides(Params(), {"prepare.train_size": args.n, "prepare.val_size": 1})
        n_gen, t_gen = _time_jobs(builtin, tmp / "gen")

        t0 = time.perf_counter()
        images, labels = generate_images(args.n, args.src_size, seed=1, num_classes=10)
        t_make = time.perf_counter() - t0
        root = tmp / "folder"
        for i, (im, y) in enumerate(zip(images, labels, strict=True)):
            (root / f"class{y}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(root / f"class{y}" / f"{i}.jpg", quality=90)
        folder = with_overrides(Params(), {"prepare.source": "imagefolder", "prepare.root": str(root)})
        n_ing, t_ing = _time_jobs(folder, tmp / "ingest")

    gen_rate, ing_rate = n_gen / t_gen, n_ing / t_ing
    print(
        f"built-in generation ({Params().base.image_size}px, incl. PNG + shard write): "
        f"{gen_rate:8.1f} images/s  ({n_gen} in {t_gen:.2f}s)"
    )
    print(f"  (raw generator at {args.src_size}px, no encoding: {args.n / t_make:8.1f} images/s)")
    print(
        f"ImageFolder ingest ({args.src_size}px JPEG → {Params().base.image_size}px): "
        f"{ing_rate:8.1f} images/s  ({n_ing} in {t_ing:.2f}s)"
    )
    print(f"ratio ingest / generation: {ing_rate / gen_rate:.2f}")


if __name__ == "__main__":
    main()
