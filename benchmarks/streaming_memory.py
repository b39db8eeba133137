"""Peak resident memory of the evaluation stages that used to hold whole datasets — probe, fidelity and the
judge's training — at N and 4N items, each measured in a fresh process (so peak RSS is that stage's alone).

  probe     stages.probe on N train / N/4 val token sequences (a random tiny GPT): features streamed to disk
            per block, chunked L-BFGS; baseline: the same probe with the features of 4N rows held in RAM
  fidelity  stages.fidelity on N generated images read from their shards; baseline: the same metrics with
            the 4N images held in RAM as one array (what the evaluate stage used to do)
  judge     stages.train_judge (a fixed number of steps) on N train images streamed from their shards; the
            baseline line says what holding the 4N images in RAM would take

Prints peak RSS and wall time per N and the 4N/N ratios (goal: RSS ratio <= 1.2).

    python benchmarks/streaming_memory.py [--n 5000] [--only probe,fidelity,judge]
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

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TQDM_DISABLE", "1")  # the inputs' progress bars would bury the figures

from pipeline.config import with_overrides  # noqa: E402
from pipeline.io import write_json  # noqa: E402

GRID, VOCAB, DIM, LAYERS, CLASSES, SIZE = 4, 64, 128, 2, 10, 64


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def params_for(n: int):
    from pipeline.config import Params

    return with_overrides(
        Params(),
        {
            "base.image_size": SIZE,
            "base.threads": 1,
            "base.num_classes": CLASSES,
            "prepare.train_size": n,
            "prepare.val_size": 200,
            "prepare.shard_size": 1000,
            "sample.n": n,
            "evaluate.probe.train_images": n,
            "evaluate.probe.val_images": n // 4,
            "evaluate.probe.max_iter": 20,
            "evaluate.probe.weight_decays": (0.01,),
            "evaluate.fidelity.kid_subsets": 10,
            "train_judge.widths": (8, 16),
            "train_judge.train": {"steps": 60, "batch_size": 32, "warmup_steps": 5, "checkpoint_every": 60},
        },
    )


# --- inputs (built in the parent process) ----------------------------------------------------------------


def build_tokens(root: Path, n: int) -> None:
    from pipeline.models.gpt import GPT, GPTConfig
    from pipeline.shards import write_shard

    rng = np.random.default_rng(0)
    tokens = root / "tokens"
    tokens.mkdir()
    for split, count in (("train", n), ("val", n // 4)):
        for shard, start in enumerate(range(0, count, 1000)):
            rows = range(start, min(start + 1000, count))
            samples = (
                (
                    f"{split}_{i:07d}",
                    {"digit.npy": rng.integers(0, VOCAB, (GRID, GRID), dtype=np.uint16), "cls": i % CLASSES},
                )
                for i in rows
            )
            write_shard(tokens / f"{split}-{shard:05d}.tar", samples)
    grid = [GRID, GRID]
    meta = {
        "digit": {"field": "digit.npy", "vocab": VOCAB, "grid": grid},
        "vq": {"field": "digit.npy", "vocab": VOCAB, "grid": grid},
    }
    write_json(
        tokens / "meta.json", {**meta, "num_classes": CLASSES, "classes": [str(c) for c in range(CLASSES)]}
    )
    from pipeline.checkpoint import save_checkpoint

    gpt = GPT(
        GPTConfig(
            vocab_size=VOCAB, block_size=GRID * GRID, n_layer=LAYERS, n_head=2, n_embd=DIM, ffn_dim=4 * DIM
        )
    )
    save_checkpoint(root / "gpt_digit", gpt.state_dict(), {**gpt.checkpoint_meta(), "variant": "digit"})


def build_images(root: Path, n: int) -> None:
    """Built-in train/val images (prepare), a random judge, its reference stats, and N 'samples'."""
    from pipeline.models.judge import save_judge
    from pipeline.shards import list_shards
    from stages import prepare, reference, train_judge

    params = params_for(n)
    prepare.run(params, out=str(root / "images"))
    torch.manual_seed(0)
    save_judge(root / "judge", train_judge.Judge(train_judge.judge_config(params, CLASSES)))
    reference.run(params, images=str(root / "images"), judge=str(root / "judge"), out=str(root / "reference"))
    samples = root / "samples"
    samples.mkdir()
    for shard in list_shards(root / "images", "train"):  # real images stand in for generated ones
        (samples / shard.name.replace("train-", "samples-")).symlink_to(shard)
    write_json(
        samples / "meta.json",
        {
            "seed": 0,
            "batch_invariant": False,
            "gpt": {"temperature": 1.0, "top_k": None, "top_p": None, "cfg_scale": 1.0},
        },
    )


# --- the measured runs (one per fresh process) -------------------------------------------------------------


def child(kind: str, root: Path, n: int, in_ram: bool) -> dict:
    torch.set_num_threads(1)
    params = params_for(n)
    t = time.perf_counter()
    if kind == "probe" and not in_ram:
        from stages import probe

        probe.run(
            params,
            "digit",
            tokens=str(root / "tokens"),
            gpt=str(root / "gpt_digit"),
            live=str(root / "probe_live"),
        )
    elif kind == "probe":
        from pipeline.evaluation import iter_subset
        from pipeline.metrics.probe import ProbeConfig, probe_layers
        from pipeline.models.gpt import load_gpt
        from pipeline.shards import list_shards
        from stages.probe import token_batches

        gpt = load_gpt(root / "gpt_digit")
        feats, labels = {}, {}
        for split, count in (("train", n), ("val", n // 4)):
            labels[split] = []
            batches = token_batches(
                iter_subset(list_shards(root / "tokens", split), count, 0), "digit.npy", 100, labels[split]
            )
            per_layer = [[] for _ in range(LAYERS)]
            with torch.no_grad():
                for b in batches:
                    for layer, h in enumerate(gpt.forward_features(b)):
                        per_layer[layer].append(h.mean(dim=1).double())
            feats[split] = [torch.cat(x) for x in per_layer]
        cfg = ProbeConfig(weight_decays=(0.01,), max_iter=20, chunk_rows=10**9)
        probe_layers(
            list(zip(feats["train"], feats["val"], strict=True)),
            np.asarray(labels["train"]),
            np.asarray(labels["val"]),
            cfg,
            progress=False,
        )
    elif kind == "fidelity" and not in_ram:
        from stages import fidelity

        fidelity.run(
            params,
            samples=str(root / "samples"),
            judge=str(root / "judge"),
            reference=str(root / "reference"),
        )
    elif kind == "fidelity":
        from pipeline.evaluation import load_images
        from pipeline.metrics.fidelity import compute_fidelity

        images, _ = load_images(root / "images", "train")
        compute_fidelity(
            images,
            reference=str(root / "reference"),
            judge_dir=str(root / "judge"),
            kid_subsets=10,
            device="cpu",
            verbose=False,
        )
    elif kind == "judge":
        from stages import train_judge

        train_judge.run(params, images=str(root / "images"), out=str(root / "judge_trained"), curves=None)
    return {"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t}


def measure(kind: str, root: Path, n: int, in_ram: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root), "--n", str(n)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        cmd + (["--in-ram"] if in_ram else []), capture_output=True, text=True, env=env, cwd=REPO
    )
    if out.returncode:
        raise RuntimeError(f"{kind} n={n}: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--only", default="probe,fidelity,judge")
    parser.add_argument("--child")
    parser.add_argument("--root")
    parser.add_argument("--in-ram", action="store_true")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.root), args.n, args.in_ram)))
        return
    print(f"load average {os.getloadavg()[0]:.1f}; each figure from a fresh process, 1 torch thread")
    for kind in args.only.split(","):
        rows = {}
        with tempfile.TemporaryDirectory() as tmp:
            for n in (args.n, 4 * args.n):
                root = Path(tmp) / f"n{n}"
                root.mkdir()
                (build_tokens if kind == "probe" else build_images)(root, n)
                rows[n] = measure(kind, root, n)
                print(
                    f"{kind:<9} N={n:>6}: peak RSS {rows[n]['peak_rss_mb']:7.0f} MB, {rows[n]['seconds']:6.1f} s"
                )
            small, big = rows[args.n], rows[4 * args.n]
            print(
                f"{kind:<9} 4N/N: RSS {big['peak_rss_mb'] / small['peak_rss_mb']:.2f} (goal <= 1.2), "
                f"time {big['seconds'] / small['seconds']:.2f}"
            )
            if kind in ("probe", "fidelity"):
                ram = measure(kind, Path(tmp) / f"n{4 * args.n}", 4 * args.n, in_ram=True)
                print(
                    f"{kind:<9} N={4 * args.n:>6} held in RAM (the old way): peak RSS {ram['peak_rss_mb']:7.0f} MB "
                    f"({ram['peak_rss_mb'] / big['peak_rss_mb']:.2f}x the streamed stage)"
                )
            else:
                held = 4 * args.n * SIZE * SIZE * 3 / 2**20
                print(f"{kind:<9} holding the {4 * args.n} train images in RAM would take {held:.0f} MB more")


if __name__ == "__main__":
    main()
