"""Stage `reference`: the real val set measured once for FID/KID/precision-recall — `<out>/reference.safetensors`
(mu, sigma and the features KID and PR need) and `<out>/reference.json` (extractor, N, image size, the
weights' sha256) — so the fidelity stages extract features of generated images only. The val images are
streamed from their shards in batches.

The extractor is `evaluate.fidelity.extractor`: `judge` (models/judge, trained here) or `inception-v3-compat`
(torch-fidelity's Inception from a local weights file: the standard, published-comparable numbers).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import Params
from pipeline.evaluation import image_subset
from pipeline.metrics.fidelity import load_reference, reference_stats
from pipeline.stage import MapJobs, stage_main
from pipeline.train import resolve_device

log = logging.getLogger("digit.reference")
PATHS = {
    "images": "data/images",
    "judge": "models/judge",
    "out": "data/reference",
    "metrics": "metrics/reference.json",
}


def fidelity_device(device: str) -> str:
    """base.device ("auto" | "cpu" | "cuda") as pipeline.metrics.fidelity takes it."""
    return resolve_device(device).type


def run(
    params: Params,
    images: str = PATHS["images"],
    judge: str = PATHS["judge"],
    out: str = PATHS["out"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    f = params.evaluate.fidelity
    real = image_subset(images, "val", f.reference_images, f.seed)
    log.info("reference: %d val images, extractor %s", len(real), f.extractor)
    reference_stats(
        real,
        out,
        extractor=f.extractor,
        judge_dir=judge if f.extractor == "judge" else None,
        inception_weights=f.inception_weights,
        batch_size=f.batch_size,
        device=fidelity_device(params.base.device),
        verbose=True,
    )
    tensors, meta = load_reference(out)
    return {
        "extractor": f.extractor,
        "n": meta["n"],
        "image_size": meta["image_size"][0],
        "feature_dim": int(tensors["mu"].shape[0]),
        "seed": f.seed,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    return stage_main("reference", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
