"""Stage `class_match`: does a sample look like the class it was asked for? The judge's top-1 on one
variant's class-conditional samples against the class each was drawn for (`<variant>_class_top1`; a
classification accuracy score in the spirit of CAS; chance is 1 / classes). Samples are streamed from their
shards. An unconditional sample set has nothing to match and reports `<variant>_class_conditional: 0`; so
does a run without a judge (train_judge is skipped with the Inception extractor)."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import Params
from pipeline.evaluation import require
from pipeline.models.judge import evaluate_accuracy, judge_is_trained, load_judge
from pipeline.stage import MapJobs, stage_main
from pipeline.train import resolve_device
from stages.sample import NO_CLASS, sample_images
from stages.train_gpt import check_variant, fill_variant

log = logging.getLogger("digit.class_match")
PATHS = {
    "variant": "digit",
    "samples": "data/samples/{variant}",
    "judge": "models/judge",
    "metrics": "metrics/class_match_{variant}.json",
}


def run(
    params: Params,
    variant: str = PATHS["variant"],
    samples: str = PATHS["samples"],
    judge: str = PATHS["judge"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    check_variant(variant)
    images, _ = sample_images(fill_variant(samples, variant), variant)
    conditional = bool(len(images.labels)) and not (images.labels == NO_CLASS).any()
    m: dict[str, Any] = {f"{variant}_class_conditional": int(conditional), f"{variant}_class_n": len(images)}
    if not conditional:
        log.info("class_match[%s]: the samples are unconditional; nothing to match", variant)
    elif not judge_is_trained(require(judge, "judge", "train_judge")):
        log.warning("class_match[%s]: %s holds no trained judge (extractor is not 'judge')", variant, judge)
        m[f"{variant}_class_conditional"] = 0
    else:
        device = resolve_device(params.base.device)
        model = load_judge(judge, map_location=str(device))
        m[f"{variant}_class_top1"] = evaluate_accuracy(
            model, images, images.labels, params.evaluate.fidelity.batch_size
        )
        log.info(
            "class_match[%s]: top-1 %.3f on %d samples", variant, m[f"{variant}_class_top1"], len(images)
        )
    m["seconds"] = time.perf_counter() - t0
    return m


def main(argv: list[str] | None = None) -> int:
    return stage_main("class_match", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
