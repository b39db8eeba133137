"""Stage `fidelity_real`: the floor the sample sets' fidelity can reach — real train images at the sample
sets' N (sample.n, a seeded subset) measured against the same val reference (`real_fid`, `real_is`, ...).
FID is biased upwards at small N, so a sample set's FID means most next to this one."""

from __future__ import annotations

import logging
import time
from typing import Any

from pipeline.config import Params
from pipeline.evaluation import image_subset
from pipeline.stage import MapJobs, stage_main
from stages.fidelity import fidelity_metrics

log = logging.getLogger("digit.fidelity_real")
PATHS = {
    "images": "data/images",
    "judge": "models/judge",
    "reference": "data/reference",
    "metrics": "metrics/fidelity_real.json",
}


def run(
    params: Params,
    images: str = PATHS["images"],
    judge: str = PATHS["judge"],
    reference: str = PATHS["reference"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    real = image_subset(images, "train", params.sample.n, params.evaluate.fidelity.seed)
    m = fidelity_metrics("real", real, params, judge, reference)
    m["seconds"] = time.perf_counter() - t0
    log.info("fidelity_real: FID %.2f of %d real train images", m["real_fid"], len(real))
    return m


def main(argv: list[str] | None = None) -> int:
    return stage_main("fidelity_real", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
