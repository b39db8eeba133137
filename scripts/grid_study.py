"""A DiGIT grid finer than the demo's 8×8: what it gives the renderer's upper bound and the GPT's samples, and
what it costs — the README's table "A finer DiGIT grid". Runs the stages with one change per variant on the
outputs of a finished `dvc repro` (data/images, models/vq, models/judge, data/reference and the encoder), into
--work (default .grid_study/, git-ignored), reusing what an earlier run there finished:

  grid16         encoder.img_size 128: the same encoder at twice the input size, a 16×16 grid (K as kmeans.k);
                 the renderer's prefix holds all 256 DiGIT tokens
  grid16_merge2  the same tokens; the renderer merges each 2×2 block of them into one prefix position
                 (train_renderer.model.digit_merge 2), so its sequence is as long as the demo's

For each variant: the renderer's seconds and val accuracy and the upper bound (true val DiGIT tokens →
renderer → VQ decoder: class match and FID); with --gpt-batch, the stage-1 GPT trained on the 16×16 tokens
at those batch sizes (700 steps each; 8 = the demo's tokens per step, 32 = its sequences per step) and the
class match of its samples rendered by the last variant's renderer. The DAG's own 8×8 figures come first,
read from metrics/.

    python scripts/grid_study.py [--variants grid16 grid16_merge2] [--gpt-batch 8 32] [--work DIR]

Cost on 2 CPU cores: ~1 min of tokens, 4 min (merged) to 9 min (full prefix) per renderer, 2.5 min (batch 8)
to 8 min (batch 32) per GPT.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import Params, load_params, with_overrides  # noqa: E402
from pipeline.io import read_json, write_json  # noqa: E402

FINE = {"encoder.img_size": 128}
VARIANTS: dict[str, dict[str, Any]] = {
    "grid16": FINE,
    "grid16_merge2": {**FINE, "train_renderer.model.digit_merge": 2},
}


def once(path: Path, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """make()'s summary, cached in `path` (written last, so a killed run redoes the step)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, make())
    return read_json(path)


def fine_tokens(params: Params, work: Path) -> Path:
    from stages import extract, kmeans, tokenize

    d = work / "tokens16"
    feats, km, tokens = d / "features.zarr", d / "kmeans", d / "tokens"

    def make() -> dict[str, Any]:
        shutil.rmtree(tokens, ignore_errors=True)
        extract.run(params, out=str(feats))
        kmeans.run(params, features=str(feats), out=str(km))
        return tokenize.run(params, kmeans=str(km), out=str(tokens))

    once(d / "tokenize.json", make)
    return tokens


def renderer_row(name: str, params: Params, tokens: Path, work: Path) -> dict[str, Any]:
    from stages import train_renderer, upper_bound

    d = work / name
    r = once(
        d / "train_renderer.json",
        lambda: train_renderer.run(params, tokens=str(tokens), out=str(d / "renderer"), curves=None),
    )
    u = once(
        d / "upper_bound.json",
        lambda: upper_bound.run(
            params, tokens=str(tokens), renderer=str(d / "renderer"), out=str(d / "ub"), live=str(d / "live")
        ),
    )
    return {
        "variant": name,
        "renderer_s": r["seconds"],
        "renderer_val_acc": r["val_acc"],
        "upper_class": u["upper_digit_renderer_class_top1"],
        "upper_fid": u["upper_digit_renderer_fid"],
        "renderer": str(d / "renderer"),
    }


def gpt_row(batch: int, params: Params, tokens: Path, renderer: str, work: Path) -> dict[str, Any]:
    from stages import class_match, sample, train_gpt

    d = work / f"gpt16_batch{batch}"
    p = with_overrides(params, {"train_gpt.train.batch_size": batch})
    g = once(d / "train_gpt.json", lambda: train_gpt.run(p, "digit", str(tokens), str(d / "gpt"), None))

    def samples() -> dict[str, Any]:
        sample.run(
            p,
            "digit",
            gpt=str(d / "gpt"),
            renderer=renderer,
            tokens=str(tokens),
            out=str(d / "samples"),
            grid=str(d / "samples.png"),
        )
        return class_match.run(p, "digit", samples=str(d / "samples"))

    c = once(d / "class_match.json", samples)
    return {
        "batch": batch,
        "gpt_s": g["seconds"],
        "gpt_val_acc": g["val_acc"],
        "class": c["digit_class_top1"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument(
        "--gpt-batch", nargs="*", type=int, default=[], help="GPT batch sizes on the 16×16 tokens"
    )
    ap.add_argument("--work", type=Path, default=REPO / ".grid_study")
    args = ap.parse_args()
    os.chdir(REPO)  # the stages' default paths are the DAG's, relative to the repo
    base = load_params(REPO / "params.yaml")
    m = {name: read_json(REPO / "metrics" / f"{name}.json") for name in ("train_renderer", "upper_bound")}
    g, c = (
        read_json(REPO / "metrics/train_gpt_digit.json"),
        read_json(REPO / "metrics/class_match_digit.json"),
    )
    print(f"{'DiGIT grid':<16} {'renderer s':>10} {'val acc':>7} {'UB class':>8} {'UB FID':>7}")
    ub = m["upper_bound"]
    print(
        f"{'8x8 (the DAG)':<16} {m['train_renderer']['seconds']:10.0f} {m['train_renderer']['val_acc']:7.3f} "
        f"{ub['upper_digit_renderer_class_top1']:8.3f} {ub['upper_digit_renderer_fid']:7.1f}"
    )
    tokens = fine_tokens(with_overrides(base, FINE), args.work)
    rows = [renderer_row(n, with_overrides(base, VARIANTS[n]), tokens, args.work) for n in args.variants]
    for r in rows:
        print(
            f"{r['variant']:<16} {r['renderer_s']:10.0f} {r['renderer_val_acc']:7.3f} {r['upper_class']:8.3f} "
            f"{r['upper_fid']:7.1f}"
        )
    gpts = [
        gpt_row(b, with_overrides(base, VARIANTS[args.variants[-1]]), tokens, rows[-1]["renderer"], args.work)
        for b in args.gpt_batch
    ]
    if gpts:
        print(f"\n{'stage-1 GPT':<16} {'GPT s':>10} {'val acc':>7} {'samples class':>13}")
        print(f"{'8x8 (the DAG)':<16} {g['seconds']:10.0f} {g['val_acc']:7.3f} {c['digit_class_top1']:13.3f}")
        for r in gpts:
            print(
                f"{'16x16 batch ' + str(r['batch']):<16} {r['gpt_s']:10.0f} {r['gpt_val_acc']:7.3f} {r['class']:13.3f}"
            )
    (args.work / "results.json").write_text(json.dumps({"renderers": rows, "gpts": gpts}, indent=1))


if __name__ == "__main__":
    main()
