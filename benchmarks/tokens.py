"""Cost of the `tokenize` stage (images → encoder → exact nearest centroid, and the pixel VQ, fused on the
device, V views per image), its peak memory against the dataset size, the K-Means feature store's bytes per
sampled image, and a projection of these to the paper's shapes.

    python benchmarks/tokens.py [--n 400] [--views 1 2] [--batch-size 256] [--workers 1] [--threads 0]

(Named tokens.py, not tokenize.py: a script's directory comes first on sys.path, and a tokenize.py there
would shadow the standard library module of that name.)

Setup, in a temp dir: the demo's encoder architecture (params.yaml's pretrain_encoder ViT: conv stem,
random init — the cost does not depend on the weights), the demo's pixel VQ (train_vq for one step: the
same architecture), built-in images of N and 4N (train + val, `stages.prepare.run`), then `stages.extract`
and `stages.kmeans` on the N set (real stages, default K; the centroids serve both sets).

Measured, all in this run:
  (a) `stages.tokenize.run` in a fresh child process per (set, V): images/s, CPU s (the process and its
      DataLoader workers), and peak RSS (the child's VmHWM; a worker's own peak is its ru_maxrss) — at N and
      4N for the first V, at N for every other V. Goals: time 4N / N ≤ 4.4, peak RSS 4N / N ≤ 1.2. The
      child builds the models and runs one warm-up batch before the timed run (the dataset-independent
      baseline of the RSS columns).
  (b) store bytes per sampled image (extract on the N set, every train image sampled).
  (c) FLOP per image of tokenize (torch's FlopCounterMode: encoder up to block `layer`, the assignment
      matmul, the VQ encoder and its codebook lookup) and the GFLOP/s it reached in (a).
Projection (printed): ImageNet-1k (1,281,167 train + 50,000 val images), DINOv2 ViT-B/14 with registers at
224 (256 patches × 768, block -3), K = 8192, the taming VQGAN f16 with 1024 codes at 256 px, extract.sample
0.1: store size, token-shard size (real `write_shard` of samples of those shapes, tar overhead included)
and FLOP per image of tokenize, for each V.

Peak RSS is the child's VmHWM (/proc/self/status), not ru_maxrss: a child started by fork + exec inherits
the parent's ru_maxrss high-water mark on Linux.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.checkpoint import checkpoint_sha256, save_checkpoint  # noqa: E402
from pipeline.config import Params, load_params, with_overrides  # noqa: E402
from pipeline.shards import write_shard  # noqa: E402
from pipeline.ssl.config import vit_kwargs  # noqa: E402
from pipeline.ssl.vit import ENCODER_KIND, build_vit  # noqa: E402
from pipeline.tokenizer import (  # noqa: E402
    DigitTokenizer,
    encoder_from_params,
    load_centroids,
    pixel_vq_on,
    tokenize_views,
)
from stages import extract, kmeans, prepare, tokenize, train_vq  # noqa: E402

IMAGENET_TRAIN, IMAGENET_VAL = 1_281_167, 50_000
DEMO = load_params(Path(__file__).resolve().parents[1] / "params.yaml")  # the demo's settings


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS = now, VmHWM = peak of this process image), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def write_encoder(directory: Path, image_size: int) -> Path:
    """The demo encoder's architecture (params.yaml pretrain_encoder), random weights, in export layout."""
    pe = DEMO.pretrain_encoder
    kwargs = vit_kwargs(image_size, pe.patch_size, pe.embed_dim, pe.depth, pe.num_heads, pe.mlp_ratio)
    torch.manual_seed(0)
    vit = build_vit(kwargs, pe.stem)
    meta = {
        "kind": ENCODER_KIND,
        "timm_kwargs": kwargs,
        "stem": pe.stem,
        "mean": list(pe.mean),
        "std": list(pe.std),
        "img_size": image_size,
        "patch_size": pe.patch_size,
    }
    return save_checkpoint(directory, vit.state_dict(), meta)


def make_params(args: argparse.Namespace, encoder_dir: Path, n: int, views: int) -> Params:
    val = max(1, n // 5)
    return with_overrides(
        DEMO,
        {
            "base.image_size": args.image_size,
            "prepare.train_size": n - val,
            "prepare.val_size": val,
            "prepare.shard_size": args.shard_size,
            "encoder.weights": str(encoder_dir),
            "extract.sample": 1.0,
            "tokenize.views": views,
            "tokenize.batch_size": args.batch_size,
            "tokenize.workers": args.workers if args.workers == "auto" else int(args.workers),
            "train_vq.train": {"steps": 1, "warmup_steps": 0, "batch_size": 4, "checkpoint_every": 1},
        },
    )


def child(params_json: str, paths_json: str) -> None:
    """In a fresh process: build the models, one warm-up batch, then the real stage; print figures as JSON."""
    rss_imports = proc_status_kib("VmRSS")
    params = Params.model_validate_json(params_json)
    paths = json.loads(paths_json)
    encoder = encoder_from_params(params.encoder, params.base)
    centroids, _ = load_centroids(paths["kmeans"])
    vq = pixel_vq_on(paths["vq"], checkpoint_sha256(paths["vq"]), encoder.device)
    s, b = params.base.image_size, params.tokenize.batch_size
    warm = torch.randint(0, 256, (params.tokenize.views, b, s, s, 3), dtype=torch.uint8)
    tokenize_views(DigitTokenizer(encoder, centroids), vq, warm)
    hwm_warm = proc_status_kib("VmHWM")
    t0, c0 = time.perf_counter(), time.process_time()
    summary = tokenize.run(params, **paths)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    workers = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        json.dumps(
            {
                "images": summary["train_images"] + summary["val_images"],
                "views": summary["views"],
                "wall": wall,
                "cpu": cpu + workers.ru_utime + workers.ru_stime,
                "rss_imports_kib": rss_imports,
                "hwm_warm_kib": hwm_warm,
                "peak_kib": proc_status_kib("VmHWM"),
                "worker_maxrss_kib": workers.ru_maxrss,
                "threads": torch.get_num_threads(),
            }
        )
    )


def run_child(params: Params, paths: dict[str, str], threads: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        params.model_dump_json(),
        json.dumps(paths),
    ]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"tokenize child failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def tokenize_flops(
    encoder_model, block: int, img: int, k: int, vq, vq_img: int, device: str
) -> dict[str, int]:
    """FLOP of one image of one view: encoder up to `block` (+ final norm), assignment, VQ encode."""
    x = torch.zeros(1, 3, img, img, device=device)
    enc = count_flops(
        lambda: encoder_model.forward_intermediates(
            x, indices=[block], norm=True, output_fmt="NLC", intermediates_only=True, stop_early=True
        )
    )
    grid = encoder_model.patch_embed.grid_size
    tokens, dim = grid[0] * grid[1], encoder_model.embed_dim
    z = torch.zeros(1, 3, vq_img, vq_img, device=device)
    latents = vq.encode_latents(z)
    vq_enc = count_flops(lambda: vq.encode_latents(z))
    cells, code_dim = latents.shape[2] * latents.shape[3], latents.shape[1]
    return {
        "encoder": enc,
        "assign": 2 * tokens * k * dim,  # the ||x||² − 2x·c + ||c||² matmul; re-scored near-ties are rare
        "vq": vq_enc + 2 * cells * vq.codebook_size * code_dim,  # + the codebook distance matmul
    }


def token_shard_bytes(views: int, grid: int, vq_grid: int, n: int = 64) -> float:
    """Bytes per sample of a real token shard with the paper's shapes (tar headers and padding included)."""
    with tempfile.TemporaryDirectory() as tmp:
        digit = np.zeros((views, grid, grid), np.uint16)
        vq = np.zeros((views, vq_grid, vq_grid), np.uint16)
        samples = (
            (f"train_{i:07d}", tokenize.token_fields(digit + i % 7, vq + i % 5, i % 1000)) for i in range(n)
        )
        path = Path(tmp) / "train-00000.tar"
        write_shard(path, samples)
        return path.stat().st_size / n


def projection(views_list: list[int], store_overhead: float) -> None:
    import timm

    from pipeline.models.taming import TamingConfig, TamingVQGAN

    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=224)
        vqgan = TamingVQGAN(TamingConfig())  # taming's f16 ImageNet VQGAN: 1024 codes of 256-d, 16 × 16
    block = len(vit.blocks) - 3
    flops = tokenize_flops(vit, block, 224, 8192, vqgan, 256, "meta")
    per_view = sum(flops.values())
    n_sample = round(0.1 * IMAGENET_TRAIN)
    patch_bytes = 256 * 768 * 2
    store = n_sample * (patch_bytes + store_overhead)
    everything = (IMAGENET_TRAIN + IMAGENET_VAL) * patch_bytes
    print()
    print(
        "Projection: ImageNet-1k, DINOv2 ViT-B/14 reg4 at 224 (256 × 768, block -3), K = 8192, VQGAN f16 @ 256"
    )
    print(
        f"  feature store (extract.sample 0.1 = {n_sample} images × {patch_bytes} B of float16 patches + "
        f"{store_overhead:.0f} B measured overhead): {store / 1e9:.1f} GB  (every patch of every image, as "
        f"before: {everything / 1e12:.2f} TB)"
    )
    print(
        f"  FLOP per image and view: encoder {flops['encoder'] / 1e9:.1f} G + assignment "
        f"{flops['assign'] / 1e9:.2f} G + VQGAN encode {flops['vq'] / 1e9:.1f} G = {per_view / 1e9:.1f} GFLOP"
    )
    images = IMAGENET_TRAIN + IMAGENET_VAL
    print(f"  {'V':>3} {'token shards':>14} {'B / image':>10} {'FLOP / image':>13} {'FLOP, all images':>17}")
    for v in sorted({1, 2, 4, 10, *views_list}):
        per_sample = token_shard_bytes(v, 16, 16)
        print(
            f"  {v:>3} {images * per_sample / 1e9:>11.2f} GB {per_sample:>10.0f} {v * per_view / 1e9:>9.1f} G"
            f" {images * v * per_view:>17.2e}"
        )
    print(
        "  (token-shard bytes: uint16 grids in tar members of 512-B blocks; val is tokenized with V views too)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400, help="images (train + val) of the small set; big = 4n")
    ap.add_argument(
        "--views", type=int, nargs="+", default=[1, 2], help="V values; the first is run at 4N too"
    )
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=DEMO.tokenize.batch_size)
    ap.add_argument("--shard-size", type=int, default=100, help="images per shard (several shards per set)")
    ap.add_argument("--workers", default=str(DEMO.tokenize.workers), help="DataLoader workers, or auto")
    ap.add_argument(
        "--repeats", type=int, default=2, help="child runs per setting, interleaved (best wall kept)"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads in the children (0: torch's default)"
    )
    ap.add_argument("--child", nargs=2, metavar=("PARAMS_JSON", "PATHS_JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.n < 20:
        ap.error("--n must be at least 20")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_tokens_") as tmp:
        tmp = Path(tmp)
        encoder_dir = write_encoder(tmp / "encoder", args.image_size)
        v0 = args.views[0]
        sets = {"N": args.n, "4N": 4 * args.n}
        t0 = time.perf_counter()
        for name, n in sets.items():
            prepare.run(make_params(args, encoder_dir, n, v0), out=str(tmp / f"images_{name}"))
        t_prep = time.perf_counter() - t0
        small = make_params(args, encoder_dir, args.n, v0)
        m_ext = extract.run(small, images=str(tmp / "images_N"), out=str(tmp / "features.zarr"))
        kmeans.run(small, features=str(tmp / "features.zarr"), out=str(tmp / "kmeans"))
        train_vq.run(small, images=str(tmp / "images_N"), out=str(tmp / "vq"), curves=None)

        def paths(name: str, v: int) -> dict[str, str]:
            return {
                "kmeans": str(tmp / "kmeans"),
                "images": str(tmp / f"images_{name}"),
                "vq": str(tmp / "vq"),
                "out": str(tmp / f"tokens_{name}_{v}"),
            }

        settings = [("N", v0), ("4N", v0), *[("N", v) for v in args.views[1:]]]
        tries: dict[tuple[str, int], list[dict]] = {key: [] for key in settings}
        for _ in range(args.repeats):  # interleaved, so a busy spell of the machine hits every setting
            for name, v in settings:
                params = make_params(args, encoder_dir, sets[name], v)
                tries[name, v].append(run_child(params, paths(name, v), args.threads))
        runs = {}
        for key, rs in tries.items():
            runs[key] = {**min(rs, key=lambda r: r["wall"]), "peak_kib": max(r["peak_kib"] for r in rs)}

        encoder = encoder_from_params(small.encoder, small.base)
        vq = pixel_vq_on(tmp / "vq", checkpoint_sha256(tmp / "vq"), encoder.device)
        k = int(np.load(tmp / "kmeans/centroids.npy").shape[0])
        with torch.inference_mode():
            demo = tokenize_flops(
                encoder.model, encoder.block_index, encoder.img_size, k, vq, args.image_size, "cpu"
            )
        store_overhead = m_ext["store_bytes_per_image"] - encoder.num_tokens * encoder.dim * 2

    threads = {r["threads"] for r in runs.values()}
    print()
    print(
        f"encoder: demo SSL ViT (conv stem, random init) at {args.image_size} px, [T={encoder.num_tokens}, "
        f"D={encoder.dim}] of block {encoder.block_index}; K = {k}; VQ: train_vq's architecture, "
        f"{vq.codebook_size} codes; tokenize batch {args.batch_size}, DataLoader workers {args.workers}, "
        f"child torch threads {sorted(threads)}; prepare of {args.n} + {4 * args.n} images took {t_prep:.1f}s"
    )
    print(f"load average at the end: {Path('/proc/loadavg').read_text().strip()}")
    print()
    print(
        f"(a) stages.tokenize.run, each in a fresh process, best wall of {args.repeats} (peak RSS: the largest; MiB)"
    )
    head = (
        "set",
        "images",
        "V",
        "wall s",
        "images/s",
        "CPU s",
        "after imports",
        "warm",
        "peak",
        "worker peak",
    )
    print("  " + " ".join(f"{h:>13}" for h in head))
    for (name, v), r in runs.items():
        rss = [r["rss_imports_kib"], r["hwm_warm_kib"], r["peak_kib"], r["worker_maxrss_kib"]]
        print(
            f"  {name:>13} {r['images']:>13} {v:>13} {r['wall']:>13.2f} {r['images'] / r['wall']:>13.1f} "
            f"{r['cpu']:>13.2f} " + " ".join(f"{x / 1024:>13.1f}" for x in rss)
        )
    n_run, big = runs["N", v0], runs["4N", v0]
    time_ratio = big["wall"] / n_run["wall"]
    cpu_ratio = big["cpu"] / n_run["cpu"]
    rss_ratio = big["peak_kib"] / n_run["peak_kib"]
    images_ratio = big["images"] / n_run["images"]
    print(
        f"  4N / N ({images_ratio:.2f}× the images): wall time ratio {time_ratio:.3f} (goal ≤ 4.4), CPU ratio "
        f"{cpu_ratio:.3f}; peak RSS ratio {rss_ratio:.3f} (goal ≤ 1.2)"
    )
    for v in args.views[1:]:
        r = runs["N", v]
        print(
            f"  V = {v} at N: {r['wall'] / n_run['wall']:.2f}× the wall time of V = {v0} ({r['cpu'] / n_run['cpu']:.2f}× CPU)"
        )
    print()
    print(
        f"(b) feature store: {m_ext['store_bytes_per_image']:.0f} B per sampled image "
        f"({encoder.num_tokens} × {encoder.dim} × 2 B of float16 patches + {store_overhead:.0f} B of keys, labels, "
        f"rows, metadata), {m_ext['sampled_images']} images"
    )
    per_view = sum(demo.values())
    print()
    print(
        f"(c) FLOP per image and view (demo shapes): encoder {demo['encoder'] / 1e6:.1f} M + assignment "
        f"{demo['assign'] / 1e6:.1f} M + VQ {demo['vq'] / 1e6:.1f} M = {per_view / 1e6:.1f} MFLOP; "
        f"tokenize reached {per_view * v0 * big['images'] / big['wall'] / 1e9:.2f} GFLOP/s at 4N (wall)"
    )
    projection(args.views, store_overhead)


if __name__ == "__main__":
    main()
