"""Stage `prepare`: the built-in shapes data or an ImageFolder → image WebDataset shards + manifest."""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from tqdm import tqdm

from pipeline.config import Params
from pipeline.io import atomic_dir
from pipeline.prepare import finalize, plan, run_job
from pipeline.stage import MapJobs, stage_main

log = logging.getLogger("digit.prepare")
PATHS = {"out": "data/images", "metrics": "metrics/prepare.json"}


def run(
    params: Params, out: str = PATHS["out"], metrics: str | None = None, map_jobs: MapJobs | None = None
) -> dict[str, Any]:
    """Write every shard (in order, in a process pool, or through `map_jobs` — the Prefect flow's
    concurrent tasks), then the manifest; all into a temp dir renamed at the end."""
    p = plan(params)
    total = sum(j.size for j in p.jobs)
    log.info("prepare: %s data, %d images in %d shards → %s", params.prepare.source, total, len(p.jobs), out)
    with atomic_dir(out) as tmp:
        if map_jobs is not None:
            results = map_jobs(run_job, p.jobs, tmp)
        else:
            with tqdm(total=total, unit="img", desc="prepare", mininterval=1.0) as bar:
                if params.prepare.workers > 1:
                    with ProcessPoolExecutor(params.prepare.workers) as pool:
                        futures = [pool.submit(run_job, job, tmp) for job in p.jobs]
                        results = []
                        for job, fut in zip(p.jobs, futures, strict=True):
                            results.append(fut.result())
                            bar.update(job.size)
                else:
                    results = [run_job(job, tmp, bar.update) for job in p.jobs]
        summary = finalize(tmp, p, results)
    for source, reason in (r for res in results for r in res.skipped):
        log.warning("skipped %s: %s", source, reason)
    for d in p.empty_classes:
        log.warning("empty class folder: %s", d)
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("prepare", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
