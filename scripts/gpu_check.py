"""GPU check: the pipeline's CUDA paths, each against its CPU path, in about five minutes on one H200.

    make gpu-check                         # sets up .venv-gpu (the `gpu` extra: faiss-gpu), then runs this
    python scripts/gpu_check.py [--peak-tflops 790] [--quick]

Runs, printing each figure:
  1. faiss K-Means on the same data and starting centroids, CPU then GPU: seconds, speed-up, inertia;
     FAIL if the GPU inertia is off the CPU one by more than --kmeans-rtol.
  2. the `base` GPT (GPT_SIZES, 219.6M parameters at K=8192, 256 tokens, 1000 classes): the loss of one
     batch on CPU (fp32) against CUDA fp32 (--loss-rtol-fp32) and CUDA bf16 autocast (--loss-rtol-bf16),
     then bf16 training steps through the shared loop's pieces: tokens/s and MFU against --peak-tflops.
  3. batched sampling of that GPT (KV cache, `batch_invariant=False`): tokens/s.
  4. DiGIT tokenizing on CUDA (a ViT-B/14 DINOv2-shaped encoder, random weights, K centroids): the device's
     assignment must equal exact assignment of its own features, and every token that differs from the
     CPU path must be a near-tie the feature difference explains (bound printed).
  5. torchrun with NCCL on every visible GPU: 2 DDP steps of a small GPT through pipeline.train.fit against
     1 process (weights within --ddp-atol); with one GPU, an NCCL group of one (all_reduce) only.

Everything up to the first CUDA use (the data, the CPU K-Means) runs anywhere. Exit status: 0 all checks
passed; 1 a check failed (each failure is printed as FAIL, and the run goes on to the next check);
3 no CUDA device here (after the CPU part).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # runs from a checkout, installed or not (e.g. on a machine without pip)

import numpy as np  # noqa: E402
import torch  # noqa: E402

EXIT_FAILED, EXIT_NO_CUDA = 1, 3
FAILURES: list[str] = []


def say(msg: str = "") -> None:
    print(msg, flush=True)


def check(ok: bool, what: str) -> None:
    say(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        FAILURES.append(what)


def section(name: str, fn, *args) -> None:
    """Run one check; an exception is a failure of that check, and the next one still runs."""
    say(f"\n== {name}")
    t0 = time.perf_counter()
    try:
        fn(*args)
    except Exception as e:  # report and go on: one broken path must not hide the others
        check(False, f"{name}: {type(e).__name__}: {e}")
    say(f"  ({time.perf_counter() - t0:.1f} s)")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# --- 1. K-Means ------------------------------------------------------------------------------------------


def kmeans_data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Points around K well-separated centres (so CPU and GPU converge to the same optimum, and the inertia
    comparison is meaningful), and K starting centroids drawn from them; both seeded."""
    rng = np.random.default_rng(0)
    k, n, d = args.kmeans_k, args.kmeans_n, args.kmeans_dim
    centres = rng.standard_normal((k, d), dtype=np.float32) * 4.0
    x = centres[rng.integers(0, k, n)] + rng.standard_normal((n, d), dtype=np.float32)
    init = x[rng.choice(n, k, replace=False)].copy()
    return x, init


def kmeans_cpu(args: argparse.Namespace, x: np.ndarray, init: np.ndarray):
    import faiss

    from pipeline.kmeans import faiss_gpu_count, fit_kmeans

    say(f"  faiss {faiss.__version__}, {'GPU build' if faiss_gpu_count() else 'no GPU in this build'}")
    say(f"  data: N={len(x)}, D={x.shape[1]}, K={args.kmeans_k}, {args.kmeans_iter} iterations")
    cpu = fit_kmeans(x, args.kmeans_k, args.kmeans_iter, seed=0, gpu=False, init=init)
    say(f"  CPU ({faiss.omp_get_max_threads()} threads): {cpu.seconds:.2f} s, inertia {cpu.inertia:.6e}")
    return cpu


def kmeans_gpu(args: argparse.Namespace, x: np.ndarray, init: np.ndarray, cpu) -> None:
    from pipeline.kmeans import faiss_gpu_count, fit_kmeans

    if faiss_gpu_count() == 0:
        check(False, "faiss sees no GPU: install the `gpu` extra (faiss-gpu), never next to faiss-cpu")
        return
    gpu = fit_kmeans(x, args.kmeans_k, args.kmeans_iter, seed=0, gpu=True, init=init)
    rel = abs(gpu.inertia - cpu.inertia) / cpu.inertia
    say(f"  GPU ({faiss_gpu_count()} GPU): {gpu.seconds:.2f} s, inertia {gpu.inertia:.6e}")
    say(f"  speed-up {cpu.seconds / gpu.seconds:.1f}x; inertia relative difference {rel:.2e}")
    check(gpu.device == "gpu", "faiss trained on the GPU")
    check(rel <= args.kmeans_rtol, f"GPU inertia within {args.kmeans_rtol:g} (relative) of the CPU inertia")


# --- 2./3. the base GPT ----------------------------------------------------------------------------------


def base_gpt(args: argparse.Namespace):
    from pipeline.models.gpt import GPT, gpt_config

    # no dropout: the loss of a batch is then a function of the weights alone, on any device
    cfg = gpt_config("base", args.vocab, args.tokens, args.classes, dropout=0.0, class_dropout=0.0)
    return GPT(cfg, seed=0)


def token_batch(cfg, rows: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, cfg.vocab_size, (rows, cfg.block_size), generator=g),
        "label": torch.randint(0, cfg.num_classes, (rows,), generator=g),
    }


def model_flops_per_step(model, tokens_per_step: int) -> float:
    """As benchmarks/gpt_training.py: 6 x matmul parameters x tokens + attention 12 L d T x tokens."""
    c = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "trunk" in n)
    matmul += model.head.weight.numel()
    return 6 * matmul * tokens_per_step + 12 * c.n_layer * c.n_embd * c.block_size * tokens_per_step


def gpt_training(args: argparse.Namespace) -> None:
    from pipeline.train import TrainConfig, build_optimizer

    model = base_gpt(args)
    cfg = model.config
    say(f"  base GPT: {model.num_params() / 1e6:.1f}M parameters, K={cfg.vocab_size}, T={cfg.block_size}")
    small = token_batch(cfg, args.loss_rows, seed=1)
    with torch.no_grad():
        loss_cpu = float(model.training_loss(small)[0])
        dev = torch.device("cuda")
        model.to(dev)
        small_dev = {k: v.to(dev) for k, v in small.items()}
        loss_fp32 = float(model.training_loss(small_dev)[0])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_bf16 = float(model.training_loss(small_dev)[0])
    say(
        f"  loss of one {args.loss_rows}-row batch: CPU fp32 {loss_cpu:.6f}, CUDA fp32 {loss_fp32:.6f}, CUDA bf16 {loss_bf16:.6f}"
    )
    rel32, rel16 = abs(loss_fp32 - loss_cpu) / loss_cpu, abs(loss_bf16 - loss_cpu) / loss_cpu
    check(
        rel32 <= args.loss_rtol_fp32, f"CUDA fp32 loss within {args.loss_rtol_fp32:g} of CPU (is {rel32:.1e})"
    )
    check(
        rel16 <= args.loss_rtol_bf16, f"CUDA bf16 loss within {args.loss_rtol_bf16:g} of CPU (is {rel16:.1e})"
    )

    # training steps as pipeline.train.fit runs them (AdamW groups, bf16 autocast, clipping), timed alone
    model.train()
    opt = build_optimizer(model, TrainConfig(lr=1e-4))
    params = [p for group in opt.param_groups for p in group["params"]]
    batch = {k: v.to(dev) for k, v in token_batch(cfg, args.batch, seed=2).items()}
    losses, seconds = [], []
    torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = model.training_loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync()
        if step >= args.warmup:
            seconds.append(time.perf_counter() - t0)
        losses.append(float(loss))
    step_s = float(np.median(seconds))
    tokens = args.batch * cfg.block_size
    flops = model_flops_per_step(model, tokens)
    mfu = flops / step_s / (args.peak_tflops * 1e12)
    say(
        f"  bf16 training step, batch {args.batch} x {cfg.block_size} tokens: {step_s * 1e3:.1f} ms, "
        f"{tokens / step_s:,.0f} tokens/s, {flops / step_s / 1e12:.1f} TFLOP/s = MFU {mfu:.1%} of "
        f"{args.peak_tflops:g} TFLOP/s; peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    )
    check(all(math.isfinite(v) for v in losses), f"finite losses over {len(losses)} steps")
    check(
        losses[-1] < losses[0], f"the loss of the repeated batch fell ({losses[0]:.4f} -> {losses[-1]:.4f})"
    )


def gpt_sampling(args: argparse.Namespace) -> None:
    from pipeline.sampling import sample_generators

    model = base_gpt(args).to("cuda").eval()
    labels = torch.arange(args.sample_rows, device="cuda") % model.config.num_classes
    kw = {"labels": labels, "top_k": 100, "cfg_scale": 2.0, "batch_invariant": False}
    model.generate(sample_generators(0, range(2)), labels=labels[:2], n_tokens=8, top_k=100)  # warm-up
    sync()
    t0 = time.perf_counter()
    out = model.generate(sample_generators(0, range(args.sample_rows)), **kw)
    sync()
    dt = time.perf_counter() - t0
    n = out.numel()
    say(
        f"  {args.sample_rows} rows x {out.shape[1]} tokens, CFG 2 (2 x rows through the model), top-k 100, fp32"
    )
    say(f"  batched sampling: {n / dt:,.0f} tokens/s ({dt:.2f} s)")
    check(out.shape == (args.sample_rows, model.config.block_size), f"sampled shape {tuple(out.shape)}")
    check(int(out.min()) >= 0 and int(out.max()) < model.config.vocab_size, "token ids inside the vocabulary")


# --- 4. DiGIT tokenizing ---------------------------------------------------------------------------------


def tokenize(args: argparse.Namespace) -> None:
    from pipeline.assign import assign
    from pipeline.encoders import build_encoder
    from pipeline.tokenizer import DigitTokenizer

    enc = build_encoder("random", name=args.encoder, img_size=args.img_size, layer=-3, seed=0)
    images = np.random.default_rng(3).integers(
        0, 256, (args.images, args.img_size, args.img_size, 3), np.uint8
    )
    with torch.inference_mode():  # the CPU path first: its features also give the centroids
        feats_cpu = torch.cat([enc.patch_features(images[i : i + 8]) for i in range(0, len(images), 8)])
    flat = feats_cpu.reshape(-1, enc.dim)
    rows = np.random.default_rng(4).choice(len(flat), min(args.tokenize_k, len(flat)), replace=False)
    centroids = flat[torch.from_numpy(np.sort(rows))].numpy()
    k = len(centroids)
    say(
        f"  {args.encoder} (random weights) at {args.img_size} px: {len(images)} images x {enc.num_tokens} patches, D={enc.dim}, K={k}"
    )
    tokens_cpu = assign(flat, torch.from_numpy(centroids))

    gpu_tok = DigitTokenizer(enc.to("cuda"), centroids)
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        parts = [
            gpu_tok(images[i : i + args.tokenize_batch]) for i in range(0, len(images), args.tokenize_batch)
        ]
    sync()
    dt = time.perf_counter() - t0
    tokens_gpu = torch.cat([t for t, _ in parts]).reshape(-1).cpu()
    feats_gpu = torch.cat([f for _, f in parts]).reshape(-1, enc.dim).cpu()
    say(f"  CUDA tokenize: {len(images) / dt:.1f} images/s (first call, including kernel set-up)")

    check(
        torch.equal(tokens_gpu, assign(feats_gpu, torch.from_numpy(centroids))),
        "CUDA tokens = exact assignment of the CUDA features",
    )
    err = (feats_gpu - flat).norm(dim=1)
    scale = flat.norm(dim=1).max()
    say(
        f"  CUDA vs CPU features: max |difference| {float(err.max()):.2e} (largest feature norm {float(scale):.2f})"
    )
    check(
        float(err.max()) <= args.feature_rtol * float(scale),
        f"features within {args.feature_rtol:g} of the largest norm",
    )
    differ = (tokens_gpu != tokens_cpu).nonzero().reshape(-1)
    explained = 0
    c = torch.from_numpy(centroids).double()
    for i in differ.tolist():
        x = flat[i].double()
        d_cpu, d_gpu = ((x - c[tokens_cpu[i]]) ** 2).sum(), ((x - c[tokens_gpu[i]]) ** 2).sum()
        # moving x by e changes ||x - c||^2 by at most 2|e| ||x - c|| + |e|^2, for each of the two centroids
        e = float(err[i])
        bound = 2 * e * (float(d_cpu.sqrt()) + float(d_gpu.sqrt())) + 2 * e * e
        explained += float(d_gpu - d_cpu) <= bound
    say(
        f"  tokens: {len(differ)} of {len(tokens_cpu)} differ from the CPU path, {explained} of them near-ties"
    )
    check(
        explained == len(differ),
        "every CUDA/CPU token difference is a near-tie the feature difference explains",
    )


# --- 5. torchrun + NCCL ----------------------------------------------------------------------------------

DDP_WORKER = textwrap.dedent(
    """
    import itertools, json, os, sys
    sys.path.insert(0, {repo!r})
    import torch
    import torch.distributed as dist
    from pipeline.models.gpt import GPT, GPTConfig
    from pipeline.train import TrainConfig, fit

    torch.backends.cuda.matmul.allow_tf32 = False
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")  # also for a world of one: the NCCL path is what is checked
    total = torch.tensor([float(rank)], device="cuda")
    dist.all_reduce(total)
    assert int(total) == world * (world - 1) // 2, (float(total), world)
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=256, ffn_dim=1024, num_classes=10)
    GLOBAL = 32
    def batches(start):
        per = GLOBAL // world
        for step in itertools.count(start):
            g = torch.Generator().manual_seed(step)
            tokens = torch.randint(0, 512, (GLOBAL, 64), generator=g)
            labels = torch.randint(0, 10, (GLOBAL,), generator=g)
            rows = slice(rank * per, (rank + 1) * per)
            yield {{"tokens": tokens[rows], "label": labels[rows]}}
    train = TrainConfig(steps=2, lr=1e-3, warmup_steps=1, device="cuda", amp="off", checkpoint_every=2)
    out = sys.argv[1]
    summary = fit(GPT(cfg, seed=0), batches, train, out, {{"kind": "gpt"}}, progress=False)
    if rank == 0:
        print(json.dumps({{"world": summary["world_size"], "loss": summary["final_loss"]}}))
    dist.destroy_process_group()
    """
)


def torchrun(args: argparse.Namespace) -> None:
    from pipeline.checkpoint import load_checkpoint

    n = torch.cuda.device_count()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "ddp_worker.py"
        script.write_text(DDP_WORKER.format(repo=str(REPO)))
        results = {}
        for procs in sorted({1, n}):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
            run = subprocess.run(
                [*cmd, str(script), str(Path(tmp) / f"run{procs}")],
                capture_output=True,
                text=True,
                timeout=300,
                env={
                    **os.environ,
                    "OMP_NUM_THREADS": "1",
                    "NCCL_DEBUG": os.environ.get("NCCL_DEBUG", "WARN"),
                },
            )
            check(
                run.returncode == 0,
                f"torchrun --nproc_per_node {procs} (NCCL) exits 0"
                + (f": {run.stderr[-2000:]}" if run.returncode else ""),
            )
            if run.returncode == 0:
                import json

                results[procs] = json.loads(run.stdout.strip().splitlines()[-1])
                say(f"  {procs} process(es): final loss {results[procs]['loss']:.6f}")
        if n == 1:
            say(
                "  one GPU: the NCCL group of one joined and all-reduced; DDP against 1 process needs >= 2 GPUs"
            )
            return
        if len(results) == 2:
            one, many = (
                load_checkpoint(Path(tmp) / "run1" / "last")[0],
                load_checkpoint(Path(tmp) / f"run{n}" / "last")[0],
            )
            worst = max(float((one[k] - many[k]).abs().max()) for k in one)
            rel = abs(results[n]["loss"] - results[1]["loss"]) / results[1]["loss"]
            say(f"  {n} ranks vs 1: max |weight difference| {worst:.2e}, loss relative difference {rel:.2e}")
            check(worst <= args.ddp_atol, f"DDP weights within {args.ddp_atol:g} of one process")
            check(rel <= args.loss_rtol_fp32, f"DDP loss within {args.loss_rtol_fp32:g} of one process")


# --- main ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--peak-tflops", type=float, default=790.0, help="dense bf16 peak for MFU (H200 measured: ~790)"
    )
    p.add_argument("--quick", action="store_true", help="smaller problems (a smoke run, e.g. on CPU)")
    p.add_argument("--kmeans-k", type=int, default=2048)
    p.add_argument("--kmeans-n", type=int, default=262144)
    p.add_argument("--kmeans-dim", type=int, default=768)
    p.add_argument("--kmeans-iter", type=int, default=10)
    p.add_argument("--kmeans-rtol", type=float, default=1e-3)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64, help="training rows per step")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--loss-rows", type=int, default=2, help="rows of the CPU-vs-CUDA loss comparison")
    p.add_argument("--loss-rtol-fp32", type=float, default=1e-4)
    p.add_argument("--loss-rtol-bf16", type=float, default=2e-2)
    p.add_argument("--sample-rows", type=int, default=64)
    p.add_argument("--encoder", default="vit_base_patch14_reg4_dinov2.lvd142m")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--tokenize-k", type=int, default=8192)
    p.add_argument("--tokenize-batch", type=int, default=32)
    p.add_argument("--feature-rtol", type=float, default=1e-4)
    p.add_argument("--ddp-atol", type=float, default=5e-5)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        say("no CUDA here: the CPU part runs at --quick size (there is nothing to compare it with)")
        args.quick = True
    if args.quick:
        args.kmeans_k, args.kmeans_n, args.kmeans_dim, args.kmeans_iter = 64, 8192, 32, 5

    say(
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), numpy {np.__version__}"
    )
    say(f"host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    x, init = kmeans_data(args)
    say("\n== K-Means, CPU part")
    cpu = kmeans_cpu(args, x, init)

    if not cuda:
        reason = "torch has no CUDA build" if torch.version.cuda is None else "no CUDA device is visible"
        say(
            f"\nCUDA is not available ({reason}; torch {torch.__version__}): the CPU part is done, the GPU "
            "checks need a CUDA machine (`make gpu-check` there)."
        )
        return EXIT_NO_CUDA
    say(
        f"CUDA: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, NCCL {torch.cuda.nccl.version()}"
    )
    # fp32 comparisons with the CPU: TF32 would round fp32 matmuls and convolutions to 10 mantissa bits
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    section("K-Means, GPU", kmeans_gpu, args, x, init, cpu)
    section("base GPT: CPU vs CUDA loss, bf16 training step", gpt_training, args)
    section("base GPT: batched sampling", gpt_sampling, args)
    section("DiGIT tokenize on CUDA vs CPU", tokenize, args)
    section("torchrun + NCCL", torchrun, args)

    say("")
    if FAILURES:
        say(f"GPU check FAILED: {len(FAILURES)} check(s):")
        for f in FAILURES:
            say(f"  - {f}")
        return EXIT_FAILED
    say("GPU check passed: every CUDA path agrees with its CPU path.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
