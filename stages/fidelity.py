"""Stage `fidelity`: FID, IS, KID, precision and recall of one variant's samples against the stored val
reference (`<variant>_fid`, `_is`, ...), with the sampling knobs the samples were drawn with.

The samples are read from their shards one batch at a time (a torch-fidelity Dataset over the shards), so
memory does not grow with their number. The extractor is `evaluate.fidelity.extractor`: the judge (offline,
models/judge) or torch-fidelity's Inception (local weights). FID is biased upwards at small N: compare with
`fidelity_real` (real train images at the same N).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import Params
from pipeline.evaluation import require
from pipeline.metrics.fidelity import compute_fidelity
from pipeline.shards import ShardImages
from pipeline.stage import MapJobs, stage_main
from stages.reference import fidelity_device
from stages.sample import sample_images
from stages.train_gpt import check_variant, fill_variant

log = logging.getLogger("digit.fidelity")
PATHS = {
    "variant": "digit",
    "samples": "data/samples/{variant}",
    "judge": "models/judge",
    "reference": "data/reference",
    "metrics": "metrics/fidelity_{variant}.json",
}


def fidelity_metrics(prefix: str, images: ShardImages, params: Params, judge: str, reference: str) -> dict:
    """FID/IS/KID/PR of a Dataset of uint8 images against the stored reference, as <prefix>_<metric>."""
    f = params.evaluate.fidelity
    require(reference, "reference statistics", "reference")
    log.info("fidelity: %s (%d images, extractor %s)", prefix, len(images), f.extractor)
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


def run(
    params: Params,
    variant: str = PATHS["variant"],
    samples: str = PATHS["samples"],
    judge: str = PATHS["judge"],
    reference: str = PATHS["reference"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    check_variant(variant)
    images, knobs = sample_images(fill_variant(samples, variant), variant)
    m = fidelity_metrics(variant, images, params, judge, reference) | knobs
    m |= {"extractor": params.evaluate.fidelity.extractor, "fidelity_seed": params.evaluate.fidelity.seed}
    m["seconds"] = time.perf_counter() - t0
    log.info("fidelity[%s]: FID %.2f, IS %.2f", variant, m[f"{variant}_fid"], m[f"{variant}_is"])
    return m


def main(argv: list[str] | None = None) -> int:
    return stage_main("fidelity", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
