"""Cost of the `extract` stage's data path, and its peak memory against the dataset size.

    python benchmarks/extract.py [--n 500] [--batch-size 64] [--image-size 64] [--depth 6] [--dim 192]

Writes a small SSL-layout encoder (the pipeline's default ViT: patch 8, dim 192, depth 6, 3 heads,
random init) and real image shards (`stages.prepare.run`, built-in data) into a temp dir, then prints,
all measured in this run:

  (b) throughput  `stages.extract.run` images/s (read + PNG decode + K-Means view crop + preprocess +
      forward + float16 + Zarr write; every train image is sampled, extract.sample = 1.0) vs the same encoder object's forward alone on random tensors of the same batch shape
      and thread count: their ratio and the share of extract time that is not the forward; the rates
      of preprocess and read + decode alone; and the fixed cost of a run (extract.run on 2 images).
      Separate runs on a shared machine disagree by more than the effect measured, so extract.run is
      also split from the inside: the encoder's forward and preprocess calls are timed during the run
      (wrapping the methods of the cached encoder object the stage uses), which puts both sides under
      the same load. In-process figures are best of --repeats; fresh-process figures are the stage as
      DVC runs it (lazy imports included; encoder built and one batch run before timing).
  (c) memory  peak RSS of `stages.extract.run` over 2, N and 4N images, each in a fresh child process,
      with the child's RSS after imports, after the encoder build and after one warm-up batch (the
      dataset-independent baseline), and the largest shard (the stage buffers one shard at a time).

Peak RSS is the child's VmHWM (/proc/self/status), not ru_maxrss: a child started by fork/vfork + exec
inherits the parent's ru_maxrss high-water mark on Linux, so ru_maxrss would report this (large) parent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.config import Params, with_overrides  # noqa: E402
from pipeline.encoders import Encoder  # noqa: E402
from pipeline.features import shard_layout  # noqa: E402
from pipeline.shards import iter_samples  # noqa: E402
from pipeline.ssl.config import vit_kwargs  # noqa: E402
from pipeline.ssl.vit import ENCODER_KIND, build_vit  # noqa: E402
from pipeline.tokenizer import encoder_from_params  # noqa: E402
from stages import extract, prepare  # noqa: E402


def proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS = now, VmHWM = peak of this process image), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def write_encoder(directory: Path, args: argparse.Namespace) -> Path:
    """An encoder dir in the layout `pipeline.ssl.vit.export_encoder` writes (random weights: speed only)."""
    kwargs = vit_kwargs(args.image_size, args.patch, args.dim, args.depth, args.heads)
    torch.manual_seed(0)
    vit = build_vit(kwargs)
    meta = {
        "kind": ENCODER_KIND,
        "timm_kwargs": kwargs,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "img_size": args.image_size,
        "patch_size": args.patch,
    }
    return save_checkpoint(directory, vit.state_dict(), meta)


def train_count(n: int) -> int:
    """Train images of a set of n (the rest is val, which extract does not read)."""
    return n - max(1, n // 10)


def make_params(args: argparse.Namespace, encoder_dir: Path, n: int) -> Params:
    val = n - train_count(n)
    return with_overrides(
        Params(),
        {
            "base.image_size": args.image_size,
            "prepare.train_size": n - val,
            "prepare.val_size": val,
            "prepare.shard_size": args.shard_size,
            "encoder.source": "ssl",
            "encoder.weights": str(encoder_dir),
            "extract.batch_size": args.batch_size,
            "extract.sample": 1.0,
        },
    )


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process CPU seconds of a block (CPU: the work of every thread, less sensitive than wall
    time to other tenants of the machine, though not immune: shared caches and spinning threads)."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Clock:
        sync(self.device)
        self._t = (time.perf_counter(), time.process_time())
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.wall += time.perf_counter() - self._t[0]
        self.cpu += time.process_time() - self._t[1]


class InRunSplit:
    """Times the encoder's forward and preprocess calls while `stages.extract.run` runs.

    The stage gets its encoder from `encoder_from_params`, a per-process cache, so wrapping the methods
    of that object (instance attributes shadow the class's) times exactly the calls the stage makes.
    """

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.forward, self.preprocess = Clock(encoder.device), Clock(encoder.device)

    def __enter__(self) -> InRunSplit:
        model, enc = self.encoder.model, self.encoder
        model.forward_intermediates = self._timed(model.forward_intermediates, self.forward)
        enc.preprocess = self._timed(enc.preprocess, self.preprocess)
        return self

    def __exit__(self, *exc) -> None:
        del self.encoder.model.forward_intermediates, self.encoder.preprocess

    @staticmethod
    def _timed(fn, clock: Clock):
        def timed(*args, **kwargs):
            with clock:
                return fn(*args, **kwargs)

        return timed


def timed_extract(params: Params, images: Path, out: Path) -> dict:
    """One `stages.extract.run`, timed as a whole and split inside; figures as a JSON-able dict."""
    encoder = encoder_from_params(params.encoder, params.base)  # the object extract.run will use
    with InRunSplit(encoder) as split, Clock(encoder.device) as total:
        summary = extract.run(params, images=str(images), out=str(out))
    return {
        "images": summary["sampled_images"],
        "wall": total.wall,
        "cpu": total.cpu,
        "forward_wall": split.forward.wall,
        "forward_cpu": split.forward.cpu,
        "preprocess_wall": split.preprocess.wall,
    }


def random_batches(encoder: Encoder, n: int, batch_size: int, pixels: str) -> list:
    """n random images in extract's batch size: "ready" = normalised float NCHW on the device (what the
    ViT gets), "uint8" = uint8 NHWC numpy arrays, like the decoded PNGs extract stacks."""
    g = torch.Generator().manual_seed(0)
    s = encoder.img_size
    sizes = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    if pixels == "ready":
        made = {b: torch.randn(b, 3, s, s, generator=g).to(encoder.device) for b in set(sizes)}
    else:
        made = {
            b: torch.randint(0, 256, (b, s, s, 3), generator=g, dtype=torch.uint8).numpy() for b in set(sizes)
        }
    return [made[b] for b in sizes]


def time_forward(encoder: Encoder, batches: list) -> Clock:
    """The ViT forward alone: the exact call patch_features makes, minus preprocessing."""
    with Clock(encoder.device) as c, torch.inference_mode():
        for x in batches:
            encoder.model.forward_intermediates(
                x,
                indices=[encoder.block_index],
                norm=True,
                output_fmt="NLC",
                intermediates_only=True,
                stop_early=True,
            )
    return c


def time_preprocess(encoder: Encoder, batches: list) -> Clock:
    """patch_features' preprocessing alone (uint8 NHWC → normalised float NCHW on the device)."""
    with Clock(encoder.device) as c, torch.inference_mode():
        for x in batches:
            encoder.preprocess(x)
    return c


def time_decode(images: Path) -> tuple[int, Clock]:
    """Read + PNG-decode every sample of the train shards (what the stage reads, no encoder)."""
    with Clock() as c:
        n = sum(1 for _ in iter_samples(sorted(images.glob("train-*.tar"))))
    return n, c


def best(clocks: list) -> tuple[float, float]:
    """(wall, cpu) seconds, each the least over repeats: the run the other tenants disturbed least."""
    return min(c.wall for c in clocks), min(c.cpu for c in clocks)


def child(params_json: str, images: str, out: str, threads: int) -> None:
    """Runs in a fresh process: build the encoder, run the real stage, print RSS and time as JSON."""
    if threads:
        torch.set_num_threads(threads)
    rss_imports = proc_status_kib("VmRSS")
    params = Params.model_validate_json(params_json)
    encoder = encoder_from_params(params.encoder, params.base)
    rss_built = proc_status_kib("VmRSS")
    # One batch through the encoder first: the first forward pages in kernels and sizes the allocator's
    # pools (tens of MiB whatever the dataset), so growth past this point is what the stage adds.
    bs = params.extract.batch_size
    encoder.patch_features(random_batches(encoder, bs, bs, "uint8")[0])
    hwm_warm = proc_status_kib("VmHWM")
    fig = timed_extract(params, Path(images), Path(out))
    fig.update(
        rss_imports_kib=rss_imports,
        rss_built_kib=rss_built,
        hwm_warm_kib=hwm_warm,
        peak_kib=proc_status_kib("VmHWM"),
        threads=torch.get_num_threads(),
    )
    print(json.dumps(fig))


def run_child(params: Params, images: Path, out: Path, threads: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", params.model_dump_json()]
    cmd += [str(images), str(out), "--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"child run on {images} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="images (train + val) of the small set; big = 4n")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=Params().extract.batch_size)
    ap.add_argument("--shard-size", type=int, default=Params().prepare.shard_size)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="in-process runs of each measurement (best kept)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--child", nargs=3, metavar=("PARAMS_JSON", "IMAGES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, threads=args.threads)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.n < 20:
        ap.error("--n must be at least 20")

    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        encoder_dir = write_encoder(tmp / "encoder", args)
        # 2 images (1 train + 1 val): what a run costs whatever the data (setup, lazy imports, store).
        sets = {
            name: make_params(args, encoder_dir, k)
            for name, k in (("2", 2), ("N", args.n), ("4N", 4 * args.n))
        }
        t0 = time.perf_counter()
        for name, params in sets.items():
            prepare.run(params, out=str(tmp / f"images_{name}"))
        t_prep = time.perf_counter() - t0
        fill = {
            name: max(b.count for blocks in shard_layout(tmp / f"images_{name}").values() for b in blocks)
            for name in sets
        }

        # (b) in this process, on the N set; forward-only and extract interleaved in each repeat.
        small = sets["N"]
        encoder = encoder_from_params(small.encoder, small.base)
        n_train = train_count(args.n)
        ready = random_batches(encoder, n_train, args.batch_size, "ready")
        raw = random_batches(encoder, n_train, args.batch_size, "uint8")
        time_forward(encoder, ready[:1])  # warm-up: kernels, allocator pools
        c_fwd, runs, tiny = [], [], []
        for r in range(args.repeats):
            c_fwd.append(time_forward(encoder, ready))
            runs.append(timed_extract(small, tmp / "images_N", tmp / f"features_{r}.zarr"))
            tiny.append(timed_extract(sets["2"], tmp / "images_2", tmp / f"tiny_{r}.zarr"))
        pre = best([time_preprocess(encoder, raw) for _ in range(args.repeats)])
        decodes = [time_decode(tmp / "images_N") for _ in range(args.repeats)]
        n_dec, dec = decodes[0][0], best([c for _, c in decodes])
        if not runs[0]["images"] == n_dec == n_train:
            raise RuntimeError(f"expected {n_train} images, extract saw {runs[0]['images']}, decode {n_dec}")
        fwd = best(c_fwd)
        ext = (min(r["wall"] for r in runs), min(r["cpu"] for r in runs))
        fixed = (min(r["wall"] for r in tiny), min(r["cpu"] for r in tiny))

        # (c) peak RSS (and the stage's time in a fresh process), each size in its own child process.
        fresh = {
            name: run_child(p, tmp / f"images_{name}", tmp / f"rss_{name}.zarr", threads)
            for name, p in sets.items()
        }

    n, b = n_train, args.batch_size
    desc = encoder.describe()
    print()
    print(
        f"encoder: ssl ViT img {desc['img_size']} patch {desc['patch_size']} dim {desc['dim']} "
        f"depth {desc['depth']} (features of block {desc['block_index']}: [T={encoder.num_tokens}, "
        f"D={encoder.dim}]), device {encoder.device}, torch threads {threads}, batch {b}, "
        f"shard_size {args.shard_size}; prepare of 2 + {args.n} + {4 * args.n} images (train + val; extract "
        f"reads the train ones) took {t_prep:.1f}s"
    )
    print()
    print(f"(b) throughput, separate runs on {n} train images in this process (best of {args.repeats})")
    print(f"  {'':<44} {'wall images/s':>14} {'wall ms/img':>12} {'CPU ms/img':>11}")
    rows = [
        ("encoder forward only (random float NCHW)", fwd),
        ("preprocess only (uint8 NHWC → float NCHW)", pre),
        ("read + PNG decode only (iter_samples)", dec),
        ("stages.extract.run (real shards → Zarr)", ext),
    ]
    for name, (wall, cpu) in rows:
        print(f"  {name:<44} {n / wall:14.1f} {1000 * wall / n:12.3f} {1000 * cpu / n:11.3f}")
    reps = "; ".join(
        f"extract {n / r['wall']:.1f}, forward {n / c.wall:.1f}" for r, c in zip(runs, c_fwd, strict=True)
    )
    print(f"  (wall images/s of every repeat: {reps})")
    print(f"  {'':<44} {'wall':>14} {'CPU':>12}")
    print(f"  {'extract / forward-only rate ratio':<44} {fwd[0] / ext[0]:14.3f} {fwd[1] / ext[1]:12.3f}")
    share = (1 - fwd[0] / ext[0], 1 - fwd[1] / ext[1])
    print(
        f"  {'data-path share of extract time (goal ≤ 20 %)':<44} {100 * share[0]:13.1f}% {100 * share[1]:11.1f}%"
    )
    print(f"  {'fixed cost of a run (extract.run on 2 images)':<44} {fixed[0]:13.2f}s {fixed[1]:11.2f}s")
    print()
    print("(b') stages.extract.run split from the inside (encoder calls timed during the run; wall time)")
    head = ("images", "run s", "images/s", "forward s", "preproc s", "forward img/s", "data path")
    print(f"  {'':<22}" + " ".join(f"{h:>13}" for h in head))
    best_run = min(runs, key=lambda r: r["wall"])
    lines = [("this process, N (best)", best_run)]
    lines += [(f"fresh process, {name}", fresh[name]) for name in sets]
    for label, r in lines:
        fwd_rate = r["images"] / r["forward_wall"] if r["forward_wall"] else float("nan")
        cols = (r["wall"], r["images"] / r["wall"], r["forward_wall"], r["preprocess_wall"], fwd_rate)
        data = 100 * (1 - r["forward_wall"] / r["wall"])
        print(
            f"  {label:<22}{r['images']:>13} {cols[0]:>13.2f} {cols[1]:>13.1f} {cols[2]:>13.2f} "
            f"{cols[3]:>13.2f} {cols[4]:>13.1f} {data:>12.1f}%"
        )
    print("  (data path = 1 - forward s / run s: decode, preprocess, stack, fp16 cast, Zarr, setup, imports)")
    print()
    print("(c) peak RSS of stages.extract.run, each in a fresh process (MiB; VmHWM)")
    head = ("images", "largest shard", "after imports", "+ encoder", "+ 1st batch", "peak", "peak - warm")
    print("  " + " ".join(f"{h:>13}" for h in head))
    for name, r in fresh.items():
        cols = [r["rss_imports_kib"], r["rss_built_kib"], r["hwm_warm_kib"], r["peak_kib"]]
        cols.append(r["peak_kib"] - r["hwm_warm_kib"])
        print(f"  {r['images']:>13} {fill[name]:>13} " + " ".join(f"{c / 1024:>13.1f}" for c in cols))
    ratio = fresh["4N"]["peak_kib"] / fresh["N"]["peak_kib"]
    growth = (fresh["4N"]["peak_kib"] - fresh["N"]["peak_kib"]) / 1024
    print(
        f"  peak RSS ratio 4N / N: {ratio:.3f}  (goal ≤ 1.2); {growth:+.1f} MiB for "
        f"{fresh['4N']['images'] - fresh['N']['images']} more images"
    )
    if any(r["threads"] != threads for r in fresh.values()):
        print(f"  note: children ran with {[r['threads'] for r in fresh.values()]} threads, parent {threads}")


if __name__ == "__main__":
    main()
