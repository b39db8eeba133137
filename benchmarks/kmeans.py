"""faiss K-Means (pipeline.kmeans.fit_kmeans) vs scikit-learn KMeans and MiniBatchKMeans.

Everything is measured in this run on the same clustered features, K, iterations and starting centroids:
time and inertia ratios, and faiss' achieved GFLOP/s (2·N·K·D per iteration) as a fraction of the
sgemm peak measured here (numpy and torch, for the K-Means shape and a square product). Also the cost of
pipeline.assign's exact nearest-centroid search against a plain fp32 matmul + argmin.

    python benchmarks/kmeans.py                # N=50000, D=192, K=256, 20 iterations, 2 repeats
    python benchmarks/kmeans.py --k 1024 --n 100000

OPENBLAS_CORETYPE (set on some machines of this workplace) slows a current numpy; to measure the
BLAS at full speed unset it (and OPENBLAS_L2_SIZE) for this command only — the BLAS report says which
kernel ran.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch
from sklearn.cluster import KMeans, MiniBatchKMeans
from threadpoolctl import threadpool_info, threadpool_limits

from pipeline.assign import assign
from pipeline.kmeans import BLAS_QUERY_BLOCK, fit_kmeans


def clustered_features(n: int, dim: int, k: int, seed: int) -> np.ndarray:
    """Gaussian mixture with 2K uneven, anisotropic components — structure like SSL patch features."""
    rng = np.random.default_rng(seed)
    n_comp = 2 * k
    centres = rng.standard_normal((n_comp, dim)) * 2.0
    scales = rng.uniform(0.3, 1.0, (n_comp, dim))
    sizes = rng.dirichlet(np.full(n_comp, 2.0))
    comp = rng.choice(n_comp, size=n, p=sizes)
    x = centres[comp] + scales[comp] * rng.standard_normal((n, dim))
    return x.astype(np.float32)


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sgemm_peaks(n: int, dim: int, k: int, seed: int) -> dict[str, float]:
    """GFLOP/s of fp32 matmuls: the K-Means distance shape [N, D]·[D, K] and a square 2048³."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, dim, generator=g), torch.randn(dim, k, generator=g)
    sq = torch.randn(2048, 2048, generator=g)
    an, bn, sqn = a.numpy(), b.numpy(), sq.numpy()
    flops_shape, flops_sq = 2.0 * n * dim * k, 2.0 * 2048**3
    return {
        "torch [N,D]x[D,K]": flops_shape / best_seconds(lambda: a @ b, 3) / 1e9,
        "numpy [N,D]x[D,K]": flops_shape / best_seconds(lambda: an @ bn, 3) / 1e9,
        "torch 2048^3": flops_sq / best_seconds(lambda: sq @ sq, 3) / 1e9,
        "numpy 2048^3": flops_sq / best_seconds(lambda: sqn @ sqn, 3) / 1e9,
    }


def blas_report() -> list[str]:
    lines = []
    for lib in threadpool_info():
        where = os.path.basename(os.path.dirname(lib["filepath"]))
        lines.append(
            f"  {lib['internal_api']:<8} {lib['prefix']:<18} {lib.get('version') or '':<14} "
            f"kernel={lib.get('architecture', '-')!s:<10} threads={lib['num_threads']}  ({where})"
        )
    env = {v: os.environ.get(v) for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS")}
    lines.append(
        f"  env: {env}; faiss omp threads={faiss.omp_get_max_threads()}; torch threads={torch.get_num_threads()}"
    )
    return lines


def inertia_of(x: np.ndarray, centroids: np.ndarray) -> float:
    _, d = assign(x, np.asarray(centroids, dtype=np.float32), return_distances=True)
    return float(d.sum(dtype=np.float64))


def faiss_search_seconds(x: np.ndarray, centroids: np.ndarray, query_block: int, repeats: int) -> float:
    """One faiss assignment step (IndexFlatL2 top-1) with a given BLAS query block."""
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(centroids)
    saved = faiss.cvar.distance_compute_blas_query_bs
    faiss.cvar.distance_compute_blas_query_bs = query_block
    try:
        return best_seconds(lambda: index.search(x, 1), repeats)
    finally:
        faiss.cvar.distance_compute_blas_query_bs = saved


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50000)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per method; the fastest counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="limit every thread pool (BLAS, OpenMP, faiss, torch) to this many threads; "
        "1 measures compute efficiency without the synchronisation stalls of a busy machine",
    )
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    n, dim, k, niter = args.n, args.dim, args.k, args.niter
    if args.threads is not None:
        threadpool_limits(limits=args.threads)
        faiss.omp_set_num_threads(args.threads)
        torch.set_num_threads(args.threads)

    print("BLAS / thread pools:")
    print("\n".join(blas_report()))
    print(
        f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (a shared machine is noisy)"
    )
    x = clustered_features(n, dim, k, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    init = x[rng.choice(n, size=k, replace=False)].copy()  # the same start for every method
    print(f"\nfeatures: N={n} D={dim} (mixture of {2 * k} components); K={k}, {niter} iterations, same init")

    # max_points_per_centroid >= N/K: faiss trains on all N rows, like scikit-learn.
    mppc = max(-(-n // k), 256)

    def run_faiss():
        return fit_kmeans(x, k, niter=niter, seed=args.seed, max_points_per_centroid=mppc, init=init)

    def run_sklearn():
        km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd")
        return km.fit(x)

    def run_minibatch():
        mb = MiniBatchKMeans(
            n_clusters=k, init=init, n_init=1, max_iter=niter, batch_size=4096, random_state=args.seed
        )
        return mb.fit(x)

    # Methods run interleaved, `repeats` times each, and the fastest run counts: the load that other
    # processes put on a shared machine then hits every method alike.
    seconds: dict[str, list[float]] = {"faiss": [], "sklearn": [], "minibatch": []}
    fits: dict[str, object] = {}
    peaks: dict[str, float] = {}
    train_seconds: list[float] = []  # faiss training alone, without fit_kmeans' checks and inertia pass
    fastest_iteration = float("inf")
    for _ in range(args.repeats):
        for name, peak in sgemm_peaks(n, dim, k, args.seed).items():
            peaks[name] = max(peaks.get(name, 0.0), peak)
        for name, fn in (("faiss", run_faiss), ("sklearn", run_sklearn), ("minibatch", run_minibatch)):
            t0 = time.perf_counter()
            fits[name] = fn()
            seconds[name].append(time.perf_counter() - t0)
        train_seconds.append(fits["faiss"].seconds)
        fastest_iteration = min(fastest_iteration, *fits["faiss"].iteration_seconds)
    fa, sk, mb = fits["faiss"], fits["sklearn"], fits["minibatch"]
    fa_s, sk_s, mb_s = (min(seconds[m]) for m in ("faiss", "sklearn", "minibatch"))
    peak = max(peaks.values())
    print("sgemm: " + ", ".join(f"{name} {v:.1f}" for name, v in peaks.items()) + " GFLOP/s")

    in_fa, in_sk, in_mb = fa.inertia, inertia_of(x, sk.cluster_centers_), inertia_of(x, mb.cluster_centers_)
    in_init = inertia_of(x, init)
    # All of faiss' training (assignment steps and centroid updates), and its fastest iteration.
    fa_train_s = min(train_seconds)
    faiss_gflops = 2.0 * n * k * dim * niter / fa_train_s / 1e9
    faiss_best_it_gflops = 2.0 * n * k * dim / fastest_iteration / 1e9

    search_default = faiss_search_seconds(x, fa.centroids, 4096, 2)
    search_ours = faiss_search_seconds(x, fa.centroids, BLAS_QUERY_BLOCK, 2)

    # Exact assignment cost vs a plain fp32 matmul + argmin, on the trained codebook. With 1 thread the
    # ratio is the compute cost; with all threads it also shows how op count suffers on a busy machine.
    xt, ct = torch.from_numpy(x), torch.from_numpy(fa.centroids)

    def plain_argmin() -> torch.Tensor:
        out = []
        for s in range(0, n, 8192):
            b = xt[s : s + 8192]
            out.append(torch.addmm((ct * ct).sum(1)[None], b, ct.T, alpha=-2.0).argmin(1))
        return torch.cat(out)

    assign_s: dict[int, tuple[float, float]] = {}
    threads = torch.get_num_threads()
    for t in sorted({1, threads}):
        torch.set_num_threads(t)
        assign_s[t] = (best_seconds(lambda: assign(xt, ct), 2), best_seconds(plain_argmin, 2))
    torch.set_num_threads(threads)
    differ = int((plain_argmin() != assign(xt, ct)).sum())

    # Passes over the data: sklearn's Lloyd stops early once no label changes; MiniBatch counts epochs.
    mb_epochs = mb.n_steps_ * 4096 / n
    rows = [
        ("faiss training only", fa_train_s, niter, in_fa, f"{niter} it"),
        ("fit_kmeans (+exact inertia)", fa_s, niter, in_fa, f"{niter} it"),
        ("sklearn KMeans lloyd", sk_s, sk.n_iter_, in_sk, f"{sk.n_iter_} it"),
        ("sklearn MiniBatchKMeans", mb_s, mb_epochs, in_mb, f"{mb.n_steps_} steps of 4096"),
    ]
    header = f"{'method':<28}{'seconds':>9}{'x fit_kmeans':>14}{'s / pass':>10}{'inertia':>14}{'/ faiss':>9}"
    print("\n" + header + "  work")
    for name, secs, passes, inertia, work in rows:
        print(
            f"{name:<28}{secs:>9.2f}{secs / fa_s:>14.2f}{secs / passes:>10.3f}"
            f"{inertia:>14.5g}{inertia / in_fa:>9.4f}  {work}"
        )
    print(
        "all runs (s): " + "; ".join(f"{m} " + ", ".join(f"{v:.2f}" for v in s) for m, s in seconds.items())
    )
    print(f"(inertia of the shared init: {in_init:.5g})")
    frac, frac_it = faiss_gflops / peak, faiss_best_it_gflops / peak
    print(
        f"\nfaiss: {faiss_gflops:.1f} GFLOP/s over its whole training = {100 * frac:.0f}% of the best sgemm "
        f"measured ({peak:.1f}); fastest iteration {faiss_best_it_gflops:.1f} GFLOP/s = {100 * frac_it:.0f}%"
    )
    print(
        f"faiss assignment step: BLAS query block 4096 (faiss default) {search_default:.3f} s, "
        f"{BLAS_QUERY_BLOCK} (ours) {search_ours:.3f} s (x{search_default / search_ours:.2f})"
    )
    for t, (exact_s, plain_s) in assign_s.items():
        print(
            f"pipeline.assign (exact), {t} thread(s): {exact_s:.3f} s vs plain fp32 matmul+argmin "
            f"{plain_s:.3f} s (x{exact_s / plain_s:.2f})"
        )
    print(f"  ids that differ between exact and plain: {differ} of {n}")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")
    goals = {
        "faiss >= 60% of sgemm peak (whole training)": frac >= 0.6,
        "fit_kmeans no slower than sklearn KMeans": fa_s <= sk_s,
        "fit_kmeans no slower than MiniBatchKMeans": fa_s <= mb_s,
        "faiss inertia within 1% of sklearn KMeans (or lower)": in_fa <= 1.01 * in_sk,
    }
    for goal, ok in goals.items():
        print(f"  [{'met' if ok else 'NOT met'}] {goal}")

    if args.json:
        figures = {
            "n": n,
            "dim": dim,
            "k": k,
            "niter": niter,
            "sgemm_gflops": peaks,
            "seconds_all_runs": seconds,
            "faiss": {
                "seconds": fa_s,
                "inertia": in_fa,
                "gflops": faiss_gflops,
                "fraction_of_peak": frac,
                "fastest_iteration_fraction_of_peak": frac_it,
            },
            "sklearn_kmeans": {"seconds": sk_s, "inertia": in_sk, "iterations": int(sk.n_iter_)},
            "sklearn_minibatch": {"seconds": mb_s, "inertia": in_mb, "steps": int(mb.n_steps_)},
            "faiss_search_seconds": {"4096": search_default, str(BLAS_QUERY_BLOCK): search_ours},
            "faiss_training_seconds": fa_train_s,
            "assign_seconds_exact_plain_by_threads": assign_s,
            "assign_ids_differ": differ,
            "goals": goals,
        }
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
