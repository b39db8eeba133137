"""Stage `evaluate`: every number the paper reports, for our DiGIT model and the VQ-token baseline.

  fidelity      FID, IS, KID, precision, recall of each sample set against the stored val reference
                (digit_*, vq_*), and of real train images at the same N (real_*: the floor FID can reach
                with this many images and this extractor — FID is biased upwards at small N);
  class match   the judge's top-1 on each class-conditional sample set against the class each sample was
                drawn for (<variant>_class_top1; the CAS-style "does it look like what was asked"), and on
                the upper-bound images against their true class (upper_*_class_top1); chance is 1/classes;
  upper bounds  (a) the true val DiGIT tokens -> renderer -> VQ decoder (upper_digit_renderer_*: the paper's
                1.92 row, a GPT that made perfect tokens) and (b) plain VQ reconstructions of the same val
                images (upper_vq_recon_*), on evaluate.upper_bound.images val images; upper_real_* is the
                floor at that N (real train images), since N differs from the sample sets';
  linear probe  each block of both frozen GPTs, features mean-pooled over [BOS, tokens] with no label,
                one logistic-regression probe per block, the best block chosen on held-out train images
                (<variant>_probe_top1, <variant>_probe_best_layer; blocks numbered from 1) -> probe.tsv;
  stability     paper Table 1 on val images: token change rate and latent cosine under Gaussian pixel noise
                at each SNR, for the DiGIT tokenizer (encoder from params + centroids) and the pixel VQ
                tokenizer -> stability.tsv, <tokenizer>_change_rate_<snr>db, <tokenizer>_cosine_<snr>db.
                The noise is added to the images in [-1, 1] and both tokenizers see the same noisy pixels,
                unclamped (see pipeline/evaluation.py).

Outputs in `<out>/`: probe.tsv (layer, digit, vq), stability.tsv (snr_db, digit_change_rate,
vq_change_rate, digit_cosine, vq_cosine), upper_bounds.png (rows: val images, VQ reconstructions, true DiGIT
tokens rendered). The flat metrics also carry every knob that moves the numbers and ratios for the reader.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import GPTSampler, Params, RendererSampler
from pipeline.evaluation import (
    DigitStabilityTokenizer,
    gpt_probe_features,
    load_images,
    read_subset,
    render_true_tokens,
    stack_field,
    vq_reconstructions,
    vq_stability_tokenizer,
)
from pipeline.io import atomic_dir, read_json
from pipeline.metrics.fidelity import compute_fidelity, load_reference
from pipeline.metrics.probe import ProbeConfig, probe_layers
from pipeline.metrics.stability import stability_table
from pipeline.models.gpt import load_gpt
from pipeline.models.judge import Judge, evaluate_accuracy, load_judge
from pipeline.models.nar_renderer import NARRenderer
from pipeline.models.renderer import load_renderer
from pipeline.pixel_vq import load_pixel_vq, to_model_range
from pipeline.shards import list_shards
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import read_token_meta
from pipeline.tokenizer import encoder_from_params, load_centroids
from pipeline.train import resolve_device
from pipeline.viz import image_grid, save_png
from stages.reference import fidelity_device
from stages.sample import NO_CLASS, RUN_META, knob_metrics
from stages.train_gpt import VARIANTS, token_spec

log = logging.getLogger("digit.evaluate")
PATHS = {
    "images": "data/images",
    "tokens": "data/tokens",
    "kmeans": "models/kmeans",
    "vq": "models/vq",
    "gpt_digit": "models/gpt_digit",
    "gpt_vq": "models/gpt_vq",
    "renderer": "models/renderer",
    "samples_digit": "data/samples/digit",
    "samples_vq": "data/samples/vq",
    "judge": "models/judge",
    "reference": "data/reference",
    "out": "reports/eval",
    "metrics": "metrics/eval.json",
}
PROBE_TSV, STABILITY_TSV, UPPER_GRID = "probe.tsv", "stability.tsv", "upper_bounds.png"
GRID_COLUMNS = 8


def snr_key(snr_db: float) -> str:
    """30.0 -> "30db", 2.5 -> "2p5db" (metric keys carry no dots)."""
    return f"{snr_db:g}".replace(".", "p").replace("-", "m") + "db"


def _check_dir(path: str | Path, what: str, stage: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found (run `python -m stages.{stage}` first)")
    return path


def write_tsv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


# --- fidelity ------------------------------------------------------------------------------------------


def fidelity_metrics(
    prefix: str, images: np.ndarray, params: Params, judge: str, reference: str
) -> dict[str, float]:
    """FID/IS/KID/PR of uint8 images [N, H, W, 3] against the stored reference, as <prefix>_<metric>."""
    f = params.evaluate.fidelity
    log.info("evaluate: fidelity of %s (%d images)", prefix, len(images))
    r = compute_fidelity(
        images,
        reference=reference,
        extractor=f.extractor,
        judge_dir=judge if f.extractor == "judge" else None,
        inception_weights=f.inception_weights,
        kid_subset_size=f.kid_subset_size,
        kid_subsets=f.kid_subsets,
        isc_splits=f.isc_splits,
        prc_neighborhood=f.prc_neighborhood,
        seed=f.seed,
        batch_size=f.batch_size,
        device=fidelity_device(params.base.device),
        verbose=False,
    )
    return {
        f"{prefix}_fid": r["fid"],
        f"{prefix}_is": r["isc_mean"],
        f"{prefix}_is_std": r["isc_std"],
        f"{prefix}_kid": r["kid_mean"],
        f"{prefix}_kid_std": r["kid_std"],
        f"{prefix}_precision": r["precision"],
        f"{prefix}_recall": r["recall"],
        f"{prefix}_n": len(images),
    }


def class_top1(prefix: str, images: np.ndarray, labels: np.ndarray, judge: Judge) -> dict[str, float]:
    """{<prefix>_class_top1}: the judge's top-1 on uint8 images [N, H, W, 3] against `labels` [N]; empty when
    the images have no class (samples of an unconditional GPT)."""
    if len(labels) == 0 or (labels == NO_CLASS).any():
        return {}
    device = next(judge.parameters()).device
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device)
    return {f"{prefix}_class_top1": evaluate_accuracy(judge, x, torch.from_numpy(labels).long().to(device))}


def sample_set(samples_dir: str, variant: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The generated images of a variant (uint8 [N, H, W, 3]), the class each was drawn for ([N]; NO_CLASS
    when unconditional) and the flat knobs they were drawn with, read from the samples' own meta.json (what
    was used, not what params say now)."""
    directory = _check_dir(samples_dir, f"{variant} samples", f"sample --variant {variant}")
    shards = list_shards(directory, "samples")
    if not shards:
        raise FileNotFoundError(f"{directory}: no samples-*.tar shards (run `python -m stages.sample`)")
    rows = read_subset(shards, None, 0)
    images, labels = stack_field(rows, "png", str(directory)), stack_field(rows, "cls", str(directory))
    settings = read_json(directory / RUN_META)
    knobs: dict[str, Any] = {
        f"{variant}_sample_seed": settings["seed"],
        f"{variant}_sample_batch_invariant": int(settings["batch_invariant"]),
        **knob_metrics(f"{variant}_gpt", GPTSampler.model_validate(settings["gpt"])),
    }
    if "renderer" in settings:
        knobs |= knob_metrics(f"{variant}_renderer", RendererSampler.model_validate(settings["renderer"]))
    return images, labels.astype(np.int64), knobs


# --- upper bounds ----------------------------------------------------------------------------------------


def upper_bounds(
    params: Params, images: str, tokens: str, vq: str, renderer: str, device: torch.device
) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """The same seeded subset of val images, their VQ reconstructions and their true DiGIT tokens rendered:
    ({"real", "vq_recon", "digit_renderer"}: uint8 [N, H, W, 3], their classes [N], flat knobs)."""
    ub, s = params.evaluate.upper_bound, params.sample
    meta = read_token_meta(tokens)
    digit_field, _, digit_grid = token_spec(meta, "digit")
    _, _, vq_grid = token_spec(meta, "vq")
    token_rows = read_subset(list_shards(tokens, "val"), ub.images, ub.seed)
    image_rows = read_subset(list_shards(images, "val"), ub.images, ub.seed)
    if [t["__key__"] for t in token_rows] != [i["__key__"] for i in image_rows]:
        raise ValueError(
            f"{tokens} and {images}: the val token and image shards hold different keys; rerun tokenize"
        )
    real = stack_field(image_rows, "png", f"{images}/val")
    labels = stack_field(image_rows, "cls", f"{images}/val").astype(np.int64)
    digit = torch.from_numpy(stack_field(token_rows, digit_field, f"{tokens}/val").astype(np.int64))
    digit = digit.view(len(token_rows), digit_grid[0] * digit_grid[1])
    _check_dir(renderer, "renderer", "train_renderer")
    vq_model = load_pixel_vq(_check_dir(vq, "VQ model", "train_vq"), device)
    render = load_renderer(renderer, map_location=str(device)).eval()
    r = s.renderer
    log.info("evaluate: upper bounds on %d val images", len(real))
    out = {
        "real": real,
        "vq_recon": vq_reconstructions(vq_model, real, ub.batch_size, s.batch_invariant),
        "digit_renderer": render_true_tokens(
            render,
            vq_model,
            digit,
            vq_grid,
            [t["__index__"] for t in token_rows],
            ub.seed,
            batch_invariant=s.batch_invariant,
            batch_size=ub.batch_size,
            **r.generate_kwargs(nar=isinstance(render, NARRenderer)),
        ),
    }
    knobs = {
        "upper_bound_seed": ub.seed,
        "upper_bound_batch_invariant": int(s.batch_invariant),
        **knob_metrics("upper_renderer", r),
        "upper_renderer_nar": int(isinstance(render, NARRenderer)),
    }
    return out, labels, knobs


# --- linear probe ----------------------------------------------------------------------------------------


def linear_probes(
    params: Params, tokens: str, gpts: dict[str, str], device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Probe every block of each GPT on the same seeded train/val token subsets.
    -> ({variant: val top-1 per block}, flat metrics)."""
    p = params.evaluate.probe
    meta = read_token_meta(tokens)
    train = read_subset(list_shards(tokens, "train"), p.train_images, p.seed)
    val = read_subset(list_shards(tokens, "val"), p.val_images, p.seed)
    y_train = torch.from_numpy(stack_field(train, "cls", f"{tokens}/train").astype(np.int64))
    y_val = torch.from_numpy(stack_field(val, "cls", f"{tokens}/val").astype(np.int64))
    config = ProbeConfig(
        weight_decays=p.weight_decays,
        holdout_fraction=p.holdout_fraction,
        max_iter=p.max_iter,
        seed=p.seed,
        device=device.type,
    )
    curves: dict[str, list[float]] = {}
    flat: dict[str, Any] = {
        "probe_train_images": len(train),
        "probe_val_images": len(val),
        "probe_seed": p.seed,
        "probe_max_iter": p.max_iter,
        "probe_chance_top1": 1.0 / meta["num_classes"],
    }
    for variant, directory in gpts.items():
        field, _, _ = token_spec(meta, variant)
        gpt = load_gpt(_check_dir(directory, f"{variant} GPT", f"train_gpt --variant {variant}"), str(device))
        feats = []
        for rows, split in ((train, "train"), (val, "val")):
            ids = torch.from_numpy(stack_field(rows, field, f"{tokens}/{split}").astype(np.int64))
            feats.append(gpt_probe_features(gpt, ids.view(len(rows), -1), p.batch_size))
        log.info("evaluate: linear probe of %s GPT (%d blocks)", variant, len(feats[0]))
        results, best = probe_layers(
            list(zip(*feats, strict=True)), y_train, y_val, config, num_classes=meta["num_classes"]
        )
        curves[variant] = [r.val_top1 for r in results]
        flat |= {
            f"{variant}_probe_top1": results[best].val_top1,
            f"{variant}_probe_best_layer": best + 1,
            f"{variant}_probe_holdout_top1": results[best].holdout_top1,
            f"{variant}_probe_weight_decay": results[best].weight_decay,
            f"{variant}_probe_top1_last_layer": results[-1].val_top1,
            f"{variant}_probe_layers": len(results),
        }
    return curves, flat


# --- stability -------------------------------------------------------------------------------------------


def stability(
    params: Params, images: str, tokens: str, kmeans: str, vq: str, device: torch.device
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Table 1 for both tokenizers on a seeded subset of val images -> (TSV rows, flat metrics)."""
    st = params.evaluate.stability
    real, _ = load_images(images, "val", st.images, st.seed)
    x = to_model_range(real)
    centroids, _ = load_centroids(kmeans)
    digit_tok = DigitStabilityTokenizer(encoder_from_params(params.encoder, params.base), centroids)
    vq_tok = vq_stability_tokenizer(load_pixel_vq(_check_dir(vq, "VQ model", "train_vq"), device))
    log.info("evaluate: stability of both tokenizers on %d val images", len(x))
    tables = {
        "digit": stability_table(digit_tok, x, st.snrs_db, st.seed, st.batch_size),
        "vq": stability_table(vq_tok, x, st.snrs_db, st.seed, st.batch_size),
    }
    # The adapter must be the pipeline's tokenizer: its clean tokens against the stored token shards
    # (which went through float16 feature storage, so a few near-ties may differ).
    meta = read_token_meta(tokens)
    field, _, _ = token_spec(meta, "digit")
    stored = stack_field(read_subset(list_shards(tokens, "val"), st.images, st.seed), field, f"{tokens}/val")
    clean = torch.cat([digit_tok(x[i : i + st.batch_size])[0] for i in range(0, len(x), st.batch_size)])
    agreement = float((clean.view(len(x), -1).numpy() == stored.reshape(len(x), -1)).mean())

    rows: list[dict[str, float]] = []
    flat = {"stability_images": len(x), "stability_seed": st.seed, "stability_clean_agreement": agreement}
    for d, v in zip(tables["digit"], tables["vq"], strict=True):
        snr = d["snr_db"]
        rows.append(
            {
                "snr_db": snr,
                "digit_change_rate": d["change_rate"],
                "vq_change_rate": v["change_rate"],
                "digit_cosine": d["cosine"],
                "vq_cosine": v["cosine"],
            }
        )
        for name, row in (("digit", d), ("vq", v)):
            flat[f"{name}_change_rate_{snr_key(snr)}"] = row["change_rate"]
            flat[f"{name}_cosine_{snr_key(snr)}"] = row["cosine"]
    for name in ("digit", "vq"):
        flat[f"{name}_mean_change_rate"] = float(np.mean([r["change_rate"] for r in tables[name]]))
        flat[f"{name}_mean_cosine"] = float(np.mean([r["cosine"] for r in tables[name]]))
    return rows, flat


# --- the stage ------------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def targets(m: dict[str, Any]) -> dict[str, float]:
    """Ratios the paper's claims are about (lower is better for the FID ratios)."""
    return {
        # paper: 9.13 / 24.38 = 0.37 (unconditional, 219M)
        "digit_fid_over_vq_fid": _ratio(m["digit_fid"], m["vq_fid"]),
        "digit_is_over_vq_is": _ratio(m["digit_is"], m["vq_is"]),
        # how far each row is above what real images score at the same N (1 = indistinguishable)
        "digit_fid_over_real_fid": _ratio(m["digit_fid"], m["real_fid"]),
        "upper_fid_over_real_fid": _ratio(m["upper_digit_renderer_fid"], m["upper_real_fid"]),
        # how much of the upper bound the renderer loses over plain VQ reconstruction
        "upper_renderer_fid_over_vq_recon_fid": _ratio(
            m["upper_digit_renderer_fid"], m["upper_vq_recon_fid"]
        ),
        # paper: DiGIT 71.7 vs iGPT-L 60.3 top-1
        "probe_top1_delta": m["digit_probe_top1"] - m["vq_probe_top1"],
        # paper Table 1: DiGIT changes fewer tokens than VQ at every SNR (ratio < 1)
        "change_rate_ratio": _ratio(m["digit_mean_change_rate"], m["vq_mean_change_rate"]),
    }


def run(
    params: Params,
    images: str = PATHS["images"],
    tokens: str = PATHS["tokens"],
    kmeans: str = PATHS["kmeans"],
    vq: str = PATHS["vq"],
    gpt_digit: str = PATHS["gpt_digit"],
    gpt_vq: str = PATHS["gpt_vq"],
    renderer: str = PATHS["renderer"],
    samples_digit: str = PATHS["samples_digit"],
    samples_vq: str = PATHS["samples_vq"],
    judge: str = PATHS["judge"],
    reference: str = PATHS["reference"],
    out: str = PATHS["out"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    f = params.evaluate.fidelity
    device = resolve_device(params.base.device)
    _, ref_meta = load_reference(_check_dir(reference, "reference statistics", "reference"))
    m: dict[str, Any] = {
        "extractor": f.extractor,
        "reference_n": ref_meta["n"],
        "image_size": ref_meta["image_size"][0],
        "fidelity_seed": f.seed,
        "fidelity_kid_subset_size": f.kid_subset_size or 0,  # 0: min(1000, N_fake, N_real)
        "fidelity_kid_subsets": f.kid_subsets,
        "fidelity_isc_splits": f.isc_splits,
        "fidelity_prc_neighborhood": f.prc_neighborhood,
    }
    if f.extractor == "judge":
        m["judge_val_top1"] = read_json(Path(judge) / "config.json").get("val_top1", float("nan"))

    timings: dict[str, float] = {}
    t = time.perf_counter()
    judge_model = load_judge(_check_dir(judge, "judge", "train_judge"), map_location=str(device))
    n_samples = 0
    for variant, directory in (("digit", samples_digit), ("vq", samples_vq)):
        generated, labels, knobs = sample_set(directory, variant)
        n_samples = max(n_samples, len(generated))
        m |= fidelity_metrics(variant, generated, params, judge, reference) | knobs
        m |= class_top1(variant, generated, labels, judge_model)
    real, _ = load_images(images, "train", n_samples, f.seed)
    m |= fidelity_metrics("real", real, params, judge, reference)
    timings["fidelity_seconds"] = time.perf_counter() - t

    with atomic_dir(out) as tmp:
        t = time.perf_counter()
        upper, labels, knobs = upper_bounds(params, images, tokens, vq, renderer, device)
        m |= knobs | {"upper_bound_images": len(upper["real"])}
        for name in ("digit_renderer", "vq_recon"):
            m |= class_top1(f"upper_{name}", upper[name], labels, judge_model)
        m |= fidelity_metrics("upper_digit_renderer", upper["digit_renderer"], params, judge, reference)
        m |= fidelity_metrics("upper_vq_recon", upper["vq_recon"], params, judge, reference)
        floor, _ = load_images(images, "train", len(upper["real"]), f.seed)
        m |= fidelity_metrics("upper_real", floor, params, judge, reference)
        k = min(GRID_COLUMNS, len(upper["real"]))
        grid = image_grid(
            [list(upper[name][:k]) for name in ("real", "vq_recon", "digit_renderer")],
            ["val", "VQ recon", "true DiGIT -> renderer"],
            title="upper bounds",
        )
        save_png(grid, tmp / UPPER_GRID)
        timings["upper_bound_seconds"] = time.perf_counter() - t

        t = time.perf_counter()
        curves, flat = linear_probes(params, tokens, {"digit": gpt_digit, "vq": gpt_vq}, device)
        m |= flat
        n_layers = max(len(c) for c in curves.values())
        write_tsv(
            tmp / PROBE_TSV,
            ["layer", *VARIANTS],
            [
                {"layer": i + 1, **{v: (curves[v][i] if i < len(curves[v]) else "") for v in VARIANTS}}
                for i in range(n_layers)
            ],
        )
        timings["probe_seconds"] = time.perf_counter() - t

        t = time.perf_counter()
        rows, flat = stability(params, images, tokens, kmeans, vq, device)
        m |= flat
        write_tsv(tmp / STABILITY_TSV, list(rows[0]), rows)
        timings["stability_seconds"] = time.perf_counter() - t

    m |= targets(m) | timings
    m["seconds"] = time.perf_counter() - t0
    bad = [k for k, v in m.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        log.warning("evaluate: non-finite metrics %s", bad)
    log.info(
        "evaluate: FID digit %.2f vq %.2f (real %.2f, upper %.2f); class match digit %s (upper %s); "
        "probe top-1 digit %.3f vq %.3f; change rate digit %.3f vq %.3f",
        m["digit_fid"],
        m["vq_fid"],
        m["real_fid"],
        m["upper_digit_renderer_fid"],
        m.get("digit_class_top1", "n/a (unconditional)"),
        m.get("upper_digit_renderer_class_top1", "n/a"),
        m["digit_probe_top1"],
        m["vq_probe_top1"],
        m["digit_mean_change_rate"],
        m["vq_mean_change_rate"],
    )
    return m


def main(argv: list[str] | None = None) -> int:
    return stage_main("evaluate", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
