"""Stage `train_renderer`: the stage-2 renderer, trained to map the true DiGIT tokens of each image to the
pixel VQ tokens of the same image. train_renderer.model.kind `ar`: autoregressive, teacher forced, loss on the
VQ segment; `nar`: MaskGIT-style, loss on the masked VQ tokens (pipeline/models/nar_renderer.py).

Same loop and run layout as train_gpt: `<out>.partial/` while training (resumable), final weights in `<out>/`.
Metrics: final training loss, val loss / NLL and val VQ-token accuracy of the saved model (teacher forced for
`ar`; for `nar` on the masked tokens of seeded random masks, so not comparable with the AR figures).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import Params
from pipeline.models.nar_renderer import NARRenderer
from pipeline.models.renderer import Renderer, load_renderer, renderer_config
from pipeline.runs import train_and_promote
from pipeline.shards import list_shards
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import ShardStream, read_token_meta, token_views
from pipeline.train import rank_world, resolve_device
from stages.train_gpt import (
    evaluate_teacher_forced,
    token_spec,
    tokens_fingerprint,
    train_params,
    train_summary,
    val_batches,
)

log = logging.getLogger("digit.train_renderer")
PATHS = {
    "tokens": "data/tokens",
    "out": "models/renderer",
    "curves": "reports/curves/train_renderer",  # dvclive directory (pipeline/live.py)
    "metrics": "metrics/train_renderer.json",
}


def build_renderer(params: Params, meta: dict[str, Any]) -> Renderer | NARRenderer:
    """train_renderer.model.kind: ar -> Renderer, nar -> NARRenderer (MaskGIT-style), same config."""
    m = params.train_renderer.model
    _, k, (h, w) = token_spec(meta, "digit")
    _, v, (hv, wv) = token_spec(meta, "vq")
    grids = {"aligned": m.aligned, "digit_grid": (h, w), "vq_grid": (hv, wv), "digit_merge": m.digit_merge}
    config = renderer_config(m.size, k, v, h * w, hv * wv, **m.overrides(), **grids)
    model_class = NARRenderer if m.kind == "nar" else Renderer
    return model_class(config, seed=params.train_renderer.train.seed)


def run(
    params: Params,
    tokens: str = PATHS["tokens"],
    out: str = PATHS["out"],
    curves: str | None = PATHS["curves"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = params.train_renderer
    meta = read_token_meta(tokens)
    model = build_renderer(params, meta)
    c = model.config
    fields = {"digit": meta["digit"]["field"], "vq": meta["vq"]["field"]}
    rank, world = rank_world()
    # With V augmented views per image, each sample gives one view per epoch (DiGIT and VQ tokens of the
    # same view); val uses view 0.
    num_views, views = token_views(meta)
    stream = ShardStream(
        list_shards(tokens, "train"), fields, p.train.batch_size, p.train.seed, rank, world, views, num_views
    )
    log.info(
        "train_renderer[%s]: %d train images, %d DiGIT tokens (K=%d) -> %d VQ tokens (V=%d), %.2fM parameters",
        params.train_renderer.model.kind,
        stream.epoch_size,
        c.digit_len,
        c.digit_vocab_size,
        c.vq_len,
        c.vq_vocab_size,
        model.num_params() / 1e6,
    )
    run_meta = {
        **model.checkpoint_meta(),
        "tokens_sha256": tokens_fingerprint(tokens),
        "train_params": train_params(p.train),
    }
    fit = train_and_promote(model, stream.batches, p.train, params.base.device, out, run_meta, curves)
    # Every sequence runs N / m² DiGIT (merged) + M VQ positions through the trunk.
    summary = train_summary(fit, c.prefix_len + c.vq_len)
    if rank != 0:
        return summary
    device = resolve_device(params.base.device)
    trained = load_renderer(out, map_location=str(device))
    summary |= evaluate_teacher_forced(trained, val_batches(tokens, fields, p.train.batch_size), device)
    summary |= {
        "params": trained.num_params(),
        "digit_vocab": c.digit_vocab_size,
        "vq_vocab": c.vq_vocab_size,
        "digit_len": c.digit_len,
        "vq_len": c.vq_len,
        "nar": int(p.model.kind == "nar"),
        "seconds": time.perf_counter() - t0,
    }
    log.info(
        "train_renderer: final loss %.4f, val loss %.4f, val NLL %.4f, val VQ-token acc %.3f",
        summary["final_loss"],
        summary["val_loss"],
        summary["val_nll"],
        summary["val_acc"],
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_renderer", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
