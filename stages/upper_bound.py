"""Stage `upper_bound`: what the generator could reach with perfect tokens, on a seeded subset of
evaluate.upper_bound.images val images:
  (a) the true val DiGIT tokens -> renderer -> VQ decoder (`upper_digit_renderer_*`: the paper's 1.92 row, a
      stage-1 GPT that made perfect tokens), and
  (b) plain VQ reconstructions of the same images (`upper_vq_recon_*`),
each with FID/IS/KID/PR against the val reference and class match against the images' true class
(`upper_*_class_top1`), plus the real floor at the same N (`upper_real_*`, real train images: FID grows as N
shrinks). The renderer samples with sample.renderer's knobs; image j is drawn with the generator of
(evaluate.upper_bound.seed, its val index), so it does not depend on the batch or on the other images chosen
(exactly, with sample.batch_invariant).

The images are streamed batch by batch into shards (`data/upper_bound/{digit_renderer,vq_recon}-NNNNN.tar`,
keys and classes of the val images; cached by DVC, open them with `digit inspect`) and measured from there;
Through dvclive, `reports/eval/upper_bound/` holds the figures and a picture of the first val images, their
VQ reconstructions and their rendered tokens (plots/images/upper_bounds.png).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.evaluation import image_subset, iter_subset, render_true_tokens, require, vq_reconstructions
from pipeline.io import atomic_dir
from pipeline.live import log_results
from pipeline.models.judge import evaluate_accuracy, judge_is_trained, load_judge
from pipeline.models.nar_renderer import NARRenderer
from pipeline.models.renderer import load_renderer
from pipeline.pixel_vq import load_pixel_vq
from pipeline.shards import ShardImages, ShardSink, list_shards
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import read_token_meta
from pipeline.train import resolve_device
from pipeline.viz import image_grid
from stages.fidelity import fidelity_metrics
from stages.sample import knob_metrics
from stages.train_gpt import token_spec

log = logging.getLogger("digit.upper_bound")
PATHS = {
    "images": "data/images",
    "tokens": "data/tokens",
    "vq": "models/vq",
    "renderer": "models/renderer",
    "judge": "models/judge",
    "reference": "data/reference",
    "out": "data/upper_bound",
    "live": "reports/eval/upper_bound",
    "metrics": "metrics/upper_bound.json",
}
SETS = ("digit_renderer", "vq_recon")
SHARD_SIZE = 1000
GRID_COLUMNS = 8


def paired_batches(
    tokens: str, images: str, n: int, seed: int, batch: int
) -> Iterator[list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Batches of (token sample, image sample) of the same seeded val subset, streamed side by side."""
    pairs = zip(
        iter_subset(list_shards(tokens, "val"), n, seed),
        iter_subset(list_shards(images, "val"), n, seed),
        strict=True,
    )
    chunk: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for t, i in pairs:
        if t["__key__"] != i["__key__"]:
            raise ValueError(
                f"{tokens} and {images}: the val token and image shards hold different keys "
                f"({t['__key__']} vs {i['__key__']}); rerun tokenize"
            )
        chunk.append((t, i))
        if len(chunk) == batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run(
    params: Params,
    images: str = PATHS["images"],
    tokens: str = PATHS["tokens"],
    vq: str = PATHS["vq"],
    renderer: str = PATHS["renderer"],
    judge: str = PATHS["judge"],
    reference: str = PATHS["reference"],
    out: str = PATHS["out"],
    live: str = PATHS["live"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ub, r = params.evaluate.upper_bound, params.sample.renderer
    device = resolve_device(params.base.device)
    meta = read_token_meta(tokens)
    digit_field, _, _ = token_spec(meta, "digit")
    _, _, vq_grid = token_spec(meta, "vq")
    vq_model = load_pixel_vq(require(vq, "VQ model", "train_vq"), device)
    render = load_renderer(require(renderer, "renderer", "train_renderer"), map_location=str(device)).eval()
    scorer = (
        load_judge(judge, map_location=str(device))
        if judge_is_trained(require(judge, "judge", "train_judge"))
        else None
    )
    shown: dict[str, list[np.ndarray]] = {"real": [], **{name: [] for name in SETS}}
    n = 0
    with atomic_dir(out) as tmp:
        sinks = {name: ShardSink(tmp, name, SHARD_SIZE) for name in SETS}
        for chunk in paired_batches(tokens, images, ub.images, ub.seed, ub.batch_size):
            digit = torch.from_numpy(np.stack([t[digit_field] for t, _ in chunk]).astype(np.int64))
            real = np.stack([i["png"] for _, i in chunk])
            made = {
                "digit_renderer": render_true_tokens(
                    render,
                    vq_model,
                    digit.view(len(chunk), -1),
                    vq_grid,
                    [t["__index__"] for t, _ in chunk],
                    ub.seed,
                    batch_invariant=params.sample.batch_invariant,
                    batch_size=len(chunk),
                    progress=False,
                    **r.generate_kwargs(nar=isinstance(render, NARRenderer)),
                ),
                "vq_recon": vq_reconstructions(
                    vq_model, real, len(chunk), params.sample.batch_invariant, progress=False
                ),
            }
            for name, batch in made.items():
                for (_, i), img in zip(chunk, batch, strict=True):
                    sinks[name].write(i["__key__"], {"png": img, "cls": i["cls"]})
            for name, batch in (("real", real), *made.items()):
                shown[name].extend(batch[: GRID_COLUMNS - len(shown[name])])
            n += len(chunk)
        for sink in sinks.values():
            sink.close()
        log.info("upper_bound: %d val images rendered from their true tokens and reconstructed", n)
        m: dict[str, Any] = {"upper_bound_images": n, "upper_bound_seed": ub.seed}
        m["upper_bound_batch_invariant"] = int(params.sample.batch_invariant)
        m |= knob_metrics("upper_renderer", r)
        m["upper_renderer_nar"] = int(isinstance(render, NARRenderer))
        for name in SETS:
            made = ShardImages(list_shards(tmp, name))
            m |= fidelity_metrics(f"upper_{name}", made, params, judge, reference)
            if scorer is not None:  # against the true class of each val image
                m[f"upper_{name}_class_top1"] = evaluate_accuracy(scorer, made, made.labels, ub.batch_size)
    floor = image_subset(images, "train", n, params.evaluate.fidelity.seed)
    m |= fidelity_metrics("upper_real", floor, params, judge, reference)
    picture = image_grid(
        [shown["real"], shown["vq_recon"], shown["digit_renderer"]],
        ["val", "VQ recon", "true DiGIT -> renderer"],
        title="upper bounds",
    )
    log_results(live, m, images={"upper_bounds.png": picture})
    m["seconds"] = time.perf_counter() - t0
    log.info(
        "upper_bound: FID true DiGIT -> renderer %.2f, VQ recon %.2f, real %.2f",
        m["upper_digit_renderer_fid"],
        m["upper_vq_recon_fid"],
        m["upper_real_fid"],
    )
    return m


def main(argv: list[str] | None = None) -> int:
    return stage_main("upper_bound", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
