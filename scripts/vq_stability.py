"""How stable are VQ tokens, and why: retrain the pixel VQ with one change per variant and run the
`stability` stage against it (the same DiGIT tokenizer, the same noisy val images), on the outputs of a
finished `dvc repro` (data/images, data/tokens, models/kmeans, models/vq and the encoder).

Prints, per variant: val PSNR, the token change rate at every SNR of evaluate.stability.snrs_db, and the
latent cosine at the three lowest SNRs — the README's table "Why the pipeline's VQ is so stable".

    python scripts/vq_stability.py [--variants default codes4096 grid16 ...] [--work DIR]

Each variant's VQ is trained once into --work (default .vq_stability/, git-ignored) and reused by later
runs; `default` is the DAG's own models/vq. Cost on 2 CPU cores: 25-130 s of training per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import load_params, with_overrides  # noqa: E402
from pipeline.io import read_json, write_json  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "steps1200": {"train_vq.train.steps": 1200},
    "l1": {"train_vq.rec_loss": "l1"},
    "wide128_res2": {"train_vq.channels": 128, "train_vq.num_res_blocks": 2},
    "codes4096": {"train_vq.codebook_size": 4096},
    "grid16": {"train_vq.channel_mult": [1]},  # one downsampling after the 4-px stem: a 16×16 grid (f4)
    # VQGAN-shaped: no pixel-folding stem, three stride-2 stages (f8), channels 32 → 128
    "vqgan_f8": {"train_vq.stem": 1, "train_vq.channels": 32, "train_vq.channel_mult": [1, 2, 2, 4]},
}


def measure(name: str, work: Path) -> dict[str, Any]:
    from stages import stability, train_vq

    params = with_overrides(load_params(REPO / "params.yaml"), VARIANTS[name])
    vq = REPO / "models" / "vq"
    if name == "default":
        psnr = read_json(REPO / "metrics" / "train_vq.json")["val_psnr_db"]
    else:
        vq = work / name / "vq"
        if not (work / name / "train_vq.json").exists():  # written last: a killed run trains again
            shutil.rmtree(vq, ignore_errors=True)
            write_json(work / name / "train_vq.json", train_vq.run(params, out=str(vq), curves=None))
        psnr = read_json(work / name / "train_vq.json")["val_psnr_db"]
    m = stability.run(params, vq=str(vq), live=str(work / name / "live"))
    snrs = params.evaluate.stability.snrs_db
    key = stability.snr_key
    return {
        "variant": name,
        "psnr": psnr,
        "change": [m[f"vq_change_rate_{key(s)}"] for s in snrs],
        "cosine": [m[f"vq_cosine_{key(s)}"] for s in snrs],
        "digit_change": [m[f"digit_change_rate_{key(s)}"] for s in snrs],
        "snrs": list(snrs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--work", type=Path, default=REPO / ".vq_stability")
    args = ap.parse_args()
    os.chdir(REPO)  # the stages' default paths are the DAG's, relative to the repo
    rows = [measure(name, args.work) for name in args.variants]
    snrs = rows[0]["snrs"]
    print(
        f"{'VQ':<14} {'PSNR':>5}  change rate at {', '.join(f'{s:g}' for s in snrs)} dB  |  cosine, 3 lowest SNRs"
    )
    for r in rows:
        change = " ".join(f"{c:.3f}" for c in r["change"])
        cos = " ".join(f"{c:.4f}" for c in r["cosine"][-3:])
        wins = sum(d < c for d, c in zip(r["digit_change"], r["change"], strict=True))
        print(f"{r['variant']:<14} {r['psnr']:5.1f}  {change}  |  {cos}  (DiGIT lower at {wins}/{len(snrs)})")
    digit = " ".join(f"{c:.3f}" for c in rows[0]["digit_change"])
    print(f"{'DiGIT':<14} {'':>5}  {digit}")
    (args.work / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
