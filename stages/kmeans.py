"""Stage `kmeans`: faiss K-Means on a reproducible sample of the feature store's patches (the K-Means views of
extract's sampled train images) → the DiGIT codebook."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.assign import assign
from pipeline.config import Params
from pipeline.features import open_features
from pipeline.io import atomic_dir, write_json
from pipeline.kmeans import cluster_usage, fit_kmeans, sample_patches
from pipeline.stage import MapJobs, stage_main

log = logging.getLogger("digit.kmeans")
PATHS = {"features": "data/features.zarr", "out": "models/kmeans", "metrics": "metrics/kmeans.json"}
GPU = {"auto": "auto", "on": True, "off": False}


def run(
    params: Params,
    features: str = PATHS["features"],
    out: str = PATHS["out"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    p = params.kmeans
    store = open_features(features)
    patches = store["train/patches"]
    n_images, n_tokens, _ = patches.shape
    if n_images * n_tokens < p.k:
        raise ValueError(
            f"{features}: holds {n_images * n_tokens} patches ({n_images} images × {n_tokens}) but kmeans.k = "
            f"{p.k} needs at least that many: raise extract.sample or lower kmeans.k"
        )
    x = sample_patches(patches, p.sample_patches, p.seed)
    log.info(
        "kmeans: K=%d on %d patches of D=%d from %d sampled train images (%s views)",
        p.k,
        x.shape[0],
        x.shape[1],
        n_images,
        store.attrs.get("view", {}).get("mode", "?"),
    )
    result = fit_kmeans(x, p.k, p.niter, p.seed, p.max_points_per_centroid, gpu=GPU[p.gpu])
    log.info("kmeans: trained on %s in %.1fs", result.device, result.seconds)
    counts, entropy, dead = cluster_usage(assign(x, result.centroids), p.k)
    summary = {
        **result.summary(),
        "usage_entropy_bits": entropy,
        "usage_entropy_max_bits": float(np.log2(p.k)),
        "dead_clusters": dead,
    }
    summary = {k: v for k, v in summary.items() if v is not None}
    with atomic_dir(out) as tmp:
        np.save(Path(tmp) / "centroids.npy", result.centroids.astype(np.float32), allow_pickle=False)
        np.save(Path(tmp) / "usage.npy", counts, allow_pickle=False)
        encoder_attrs = {k: v for k, v in store.attrs.items() if k != "fingerprint"}
        # the artifact is a function of params and data: wall times go to the metrics only
        fit = {k: v for k, v in summary.items() if k != "seconds"}
        write_json(Path(tmp) / "kmeans.json", {**fit, "params": p.model_dump(), "encoder": encoder_attrs})
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("kmeans", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
