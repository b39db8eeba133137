"""Stage `kmeans`: faiss K-Means on a reproducible sample of the feature store's patches (the K-Means views of
extract's sampled train images) → the DiGIT codebook.

With kmeans.centroids set (a [K, D] .npy, e.g. the DiGIT authors' km_8k.npy / km_16k.npy) the given centroids
are the codebook instead: K-Means is skipped; the usage statistics (and the mean squared distance) are still
computed on the same sample of the store's patches, and the outputs have the same layout.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.assign import assign
from pipeline.config import Params
from pipeline.features import open_features
from pipeline.io import atomic_dir, sha256_files, write_json
from pipeline.kmeans import cluster_usage, fit_kmeans, read_centroids, sample_patches
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
    if p.centroids is not None:
        return import_centroids(params, features, out)
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


def import_centroids(params: Params, features: str, out: str) -> dict[str, Any]:
    """kmeans.centroids: the given codebook, checked against K and the stored features' D, with its usage on
    the sample of train patches the fit would have used."""
    p = params.kmeans
    assert p.centroids is not None
    store = open_features(features)
    attrs = dict(store.attrs)
    dim = int(store["train/patches"].shape[-1])
    encoder = f"{features}: {attrs.get('encoder')} ({attrs.get('source')}), layer {attrs.get('layer')}"
    centroids = read_centroids(p.centroids, p.k, dim, encoder)
    x = sample_patches(store["train/patches"], p.sample_patches, p.seed)
    log.info("kmeans: imported K=%d centroids from %s; usage on %d train patches", p.k, p.centroids, len(x))
    ids, distances = assign(x, centroids, return_distances=True)
    counts, entropy, dead = cluster_usage(ids, p.k)
    sq = float(np.asarray(distances).sum(dtype=np.float64))
    summary = {
        "k": p.k,
        "dim": dim,
        "imported": 1,
        "inertia": sq,
        "mean_sq_distance": sq / len(x),
        "n_points": int(len(x)),
        "usage_entropy_bits": entropy,
        "usage_entropy_max_bits": float(np.log2(p.k)),
        "dead_clusters": dead,
    }
    with atomic_dir(out) as tmp:
        np.save(Path(tmp) / "centroids.npy", centroids, allow_pickle=False)
        np.save(Path(tmp) / "usage.npy", counts, allow_pickle=False)
        encoder_attrs = {k: v for k, v in attrs.items() if k not in ("shards", "fingerprint")}
        source = {"path": str(p.centroids), "sha256": sha256_files([Path(p.centroids)])}
        write_json(
            Path(tmp) / "kmeans.json",
            {**summary, "params": p.model_dump(), "encoder": encoder_attrs, "imported_from": source},
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("kmeans", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
