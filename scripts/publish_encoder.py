"""Publish an encoder trained by `pretrain_encoder` as the project's default encoder: copy its checkpoint into
published/encoder/ (model.safetensors + config.json, a few hundred kB; its training curves under curves/) and
write MODEL_CARD.md beside it —
recipe, data, the stage's own checks (SSL vs random init), sha256 — so the default pipeline loads it through
`encoder.source: file` without pretraining.

    # train it (the pretrain_encoder section of params.yaml is the published recipe)
    dvc exp run -S encoder.source=ssl -S encoder.weights=models/encoder pretrain_encoder
    python scripts/publish_encoder.py                   # models/encoder + metrics/pretrain_encoder.json
    python scripts/publish_encoder.py --check           # is models/encoder the published encoder?

The write is atomic: a failed publish leaves the previous one in place.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from pipeline.checkpoint import CONFIG_FILE, MODEL_FILE  # noqa: E402
from pipeline.io import atomic_dir, read_json, sha256_file  # noqa: E402

CARD = "MODEL_CARD.md"
RECIPE_KEYS = (
    "objective", "stem", "patch_size", "embed_dim", "depth", "num_heads", "pool_layer", "dense_weight",
    "dense_layer", "sim_weight", "var_weight", "cov_weight", "proj_dim", "steps", "batch_size", "lr",
    "warmup_steps", "weight_decay", "global_crop_scale", "brightness", "contrast", "saturation", "hue",
    "grayscale_p", "jitter_p", "blur_sigma", "fresh_images", "seed",
)  # fmt: skip


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def check_trained(encoder: Path, metrics: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, the stage's metrics) of a trained encoder; clear errors for anything else."""
    for f in (encoder / MODEL_FILE, encoder / CONFIG_FILE, metrics):
        if not f.is_file():
            raise SystemExit(f"{f}: missing — train the encoder first (see this script's docstring)")
    config, m = read_json(encoder / CONFIG_FILE), read_json(metrics)
    if config.get("kind") != "ssl_vit" or "ssl_config" not in config:
        raise SystemExit(
            f"{encoder / CONFIG_FILE}: not an encoder trained by pretrain_encoder ({config.get('kind')!r})"
        )
    if m.get("trained") != 1 or m.get("steps") != config["steps"]:
        raise SystemExit(
            f"{metrics}: not the metrics of this training run (trained {m.get('trained')}, steps {m.get('steps')}, "
            f"encoder steps {config['steps']})"
        )
    return config, m


def model_card(
    config: dict[str, Any], m: dict[str, Any], params: dict[str, Any], digests: dict[str, str]
) -> str:
    recipe = config["ssl_config"]
    rows = "\n".join(f"| `{k}` | `{recipe[k]}` |" for k in RECIPE_KEYS if k in recipe)
    snrs = sorted(
        (k[12:-4] for k in m if k.startswith("change_rate_") and k.endswith("_ssl")),
        key=lambda s: -float(s[:-2]),
    )
    change = "\n".join(
        f"| {s[:-2]} dB | {m[f'change_rate_{s}_ssl']:.3f} | {m[f'change_rate_{s}_random']:.3f} |"
        for s in snrs
    )
    data = params.get("prepare", {})
    base = params.get("base", {})
    return f"""# The published encoder (published/encoder)

The default encoder of the tokenizer (`encoder.source: file`, `encoder.weights: published/encoder`): a small
conv-stem ViT pretrained by the pipeline's own `pretrain_encoder` stage on the built-in data, for longer than
the stage's 6-minute demo budget allows. Files: `{MODEL_FILE}` (weights), `{CONFIG_FILE}` (architecture as
timm `VisionTransformer` kwargs, normalisation, and the full SSL recipe under `ssl_config`).

## Recipe
{recipe["steps"]} steps of {recipe["objective"]} (config.json `ssl_config` has every key):

| key | value |
|---|---|
{rows}

## Data
Built-in shapes (`pipeline/synthetic.py`), {data.get("train_size")} train images at {base.get("image_size")} px,
`base.seed` {base.get("seed")}, {base.get("num_classes")} classes (the default `prepare` stage's output).

## Checks (the stage's own metrics, block {m["knn_layer"]}, K = {m["kmeans_k"]}; random init = the weights training started from)
| check | this encoder | random init |
|---|---|---|
| k-NN val top-1 (mean-pooled patches) | {m["knn_top1_ssl"]:.3f} | {m["knn_top1_random"]:.3f} (gain {m["knn_gain_points"]:+.1f} points) |
| bag-of-tokens linear probe | {m["tokens_linear_top1_ssl"]:.3f} | {m["tokens_linear_top1_random"]:.3f} |
| bag-of-tokens k-NN | {m["tokens_knn_top1_ssl"]:.3f} | {m["tokens_knn_top1_random"]:.3f} |

Token change rate under Gaussian noise (lower is stabler; {m["stability_wins"]} of {m["stability_snrs"]} SNRs below random init):

| SNR | this encoder | random init |
|---|---|---|
{change}

Training took {m["train_seconds"]:.0f} s on 2 CPU cores ({cpu_name()}, torch {torch.__version__}).

## sha256
- `{MODEL_FILE}`: `{digests[MODEL_FILE]}`
- `{CONFIG_FILE}`: `{digests[CONFIG_FILE]}`

## Reproduce
```bash
dvc exp run -S encoder.source=ssl -S encoder.weights=models/encoder pretrain_encoder
python scripts/publish_encoder.py --check
```
Same params ⇒ the same weights on the same kind of CPU; bf16 autocast (on CPUs with native bf16, and on GPUs)
and other oneDNN code paths round differently, so elsewhere expect the checks above within noise, not the
same sha256.
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="models/encoder", help="a trained encoder directory")
    ap.add_argument(
        "--metrics", default="metrics/pretrain_encoder.json", help="the run's pretrain_encoder metrics"
    )
    ap.add_argument(
        "--curves", default="reports/curves/pretrain_encoder", help="the run's training curves (dvclive dir)"
    )
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="published/encoder")
    ap.add_argument("--check", action="store_true", help="compare --encoder with --out; write nothing")
    args = ap.parse_args(argv)
    encoder, out = Path(args.encoder), Path(args.out)
    if args.check:
        for f in (encoder / MODEL_FILE, out / MODEL_FILE):
            if not f.is_file():
                raise SystemExit(f"{f}: missing")
        a, b = sha256_file(encoder / MODEL_FILE), sha256_file(out / MODEL_FILE)
        print(
            f"{encoder / MODEL_FILE}: {a}\n{out / MODEL_FILE}: {b}\n{'identical' if a == b else 'DIFFERENT'}"
        )
        return 0 if a == b else 1
    config, m = check_trained(encoder, Path(args.metrics))
    params = yaml.safe_load(Path(args.params).read_text())
    digests = {name: sha256_file(encoder / name) for name in (MODEL_FILE, CONFIG_FILE)}
    with atomic_dir(out) as tmp:
        for name in (MODEL_FILE, CONFIG_FILE):
            shutil.copy2(encoder / name, tmp / name)
        (tmp / CARD).write_text(model_card(config, m, params, digests))
        if (Path(args.curves) / "metrics.json").is_file():  # pretrain_encoder shows them as its own curves
            shutil.copytree(args.curves, tmp / "curves")
    print(f"published {encoder} -> {out} (model.safetensors sha256 {digests[MODEL_FILE]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
