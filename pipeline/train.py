"""The one training loop: every trained model of the pipeline (GPT, renderer, VQ, SSL encoder, judge).

Protocol a model implements:
    training_loss(batch: dict[str, Tensor]) -> (scalar loss, {name: float})   # logged as curves
    after_optimizer_step(step: int) -> None   # optional (EMA teacher, codebook upkeep);
                                              # may raise TrainingStopped

Steps are 0-based everywhere: `batches(s)` yields the batches of steps s, s+1, ...; the curves' `step`
and `after_optimizer_step(step)` use the index of the step just run; a checkpoint's meta["step"] is the
number of steps done, i.e. the step a resume starts at.

Exact resume: the weights, the AdamW state and the step go into run_dir/last (safetensors + JSON). Instead
of saving the torch RNG state, the global RNG is re-seeded at the start of every step with
derive_seed(cfg.seed, step, rank); so dropout masks, class dropout and any torch.rand a model or a batch
iterator calls are a function of (seed, step, rank) — identical after a resume, with no per-rank state to
gather. On CPU a resumed run ends bit-identical to an uninterrupted one (tested).

Distributed: under `torchrun --nproc_per_node N` (WORLD_SIZE > 1 in the environment) `fit` joins the process
group (gloo on CPU, NCCL on CUDA), wraps the model in DDP (gradients averaged over ranks, so N ranks with
per-rank batch B match one process with batch N*B), and rank 0 alone writes checkpoints and the curves; the
logged loss and model logs are averaged over ranks.

Gradient accumulation (cfg.accum_steps = A): each batch is split into A equal micro-batches along dim 0; each
runs forward and backward on loss / A (under DDP the first A - 1 inside no_sync, so ranks all-reduce once per
step), then one clip and one optimizer step. For a loss that is a mean over rows of per-row terms (the GPTs'
and renderers' token cross-entropy, label smoothing included: it is a per-token term) the summed gradient is
the big batch's, up to float summation order (tested). What cannot be the same draw is randomness inside the
forward: micro-batch m of rank r re-seeds the global RNG with derive_seed(seed, step, r·A + m) (with A = 1
exactly the seed used before), so dropout and class dropout are i.i.d. as in the big batch, and a run with
(ranks, A) equals one with (ranks·A, 1) draw for draw — but not the masks of one A = 1 pass over 4x the rows.
Batch statistics (BatchNorm, a VQ codebook's EMA, SSL centering) are per micro-batch: not exact there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.live import StepLog
from pipeline.ranks import init_distributed, rank_world
from pipeline.sampling import derive_seed

SCHEDULES = ("cosine", "inverse_sqrt", "constant")
AMP_MODES = ("auto", "bf16", "off")


class TrainingStopped(RuntimeError):
    """Training cannot go on (non-finite loss, collapse detected by the model, ...). The message says why."""


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | inverse_sqrt | constant (after linear warm-up)
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    weight_decay: float = 0.01  # on >=2-D weights only
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping (the norm is still logged)
    checkpoint_every: int = 500  # steps between run_dir/last checkpoints (and always at the end)
    log_every: int = 1  # curve rows every this many steps (and the last step)
    seed: int = 0
    amp: str = (
        "auto"  # auto = bf16 where it is fast (see use_bf16) | bf16 = bf16 autocast on any device | off
    )
    device: str = "auto"  # auto = cuda if available | cpu | cuda | cuda:N
    find_unused_parameters: bool = False  # DDP: set when some parameters get no gradient in some steps
    accum_steps: int = 1  # micro-batches per optimizer step (the batch is split, see the module docstring)
    warmup_init_lr: float = 0.0  # inverse_sqrt only: lr of step 0 (fairseq's --warmup-init-lr)

    def __post_init__(self) -> None:
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule: expected one of {SCHEDULES}, got {self.schedule!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"TrainConfig.amp: expected one of {AMP_MODES}, got {self.amp!r}")
        for name in ("steps", "checkpoint_every", "log_every", "accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}: expected >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0 or self.lr <= 0:
            raise ValueError(
                "TrainConfig: expected lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1; got "
                f"lr={self.lr}, warmup_steps={self.warmup_steps}, min_lr_ratio={self.min_lr_ratio}"
            )


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate of 0-based `step` (the number of updates done before it).

    cosine / constant: linear warm-up lr·(step+1)/W, then the schedule (floor: min_lr_ratio).
    inverse_sqrt: fairseq's, update for update (fairseq/optim/lr_scheduler/inverse_square_root_schedule.py:
    the trainer calls step_update(num_updates) after each update, so update k runs at
    warmup_init_lr + k·(lr − warmup_init_lr)/W for k < W and at lr·sqrt(W/k) from k = W on), then the floor.
    """
    floor = cfg.min_lr_ratio
    if cfg.schedule == "inverse_sqrt":
        w = cfg.warmup_steps
        if step < w:
            return cfg.warmup_init_lr + step * (cfg.lr - cfg.warmup_init_lr) / w
        return cfg.lr * max(floor, math.sqrt(max(w, 1) / max(step, 1)))
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        factor = 1.0
    else:  # cosine
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * factor


def use_bf16(amp: str, device: torch.device) -> bool:
    """Whether a run with `amp` trains under bf16 autocast on `device`.

    "auto" takes bf16 on CUDA and on CPUs whose oneDNN has native bf16 matmuls (AVX-512/AMX), fp32
    elsewhere: on an AVX2-only CPU, bf16 autocast is emulated and ran a GPT training step 15x slower than
    fp32 here (d192, 4 layers, batch 32 x 64 tokens: ~10 s vs ~0.6 s).
    """
    if amp == "off":
        return False
    if amp == "bf16" or device.type == "cuda":
        return True
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={name!r} but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        # Under torchrun each rank takes its own GPU.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


class _LossModule(nn.Module):
    """Routes DDP's forward to `training_loss`, so gradient sync works for the protocol's method."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.model.training_loss(batch)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on >=2-D weights (matrices, embeddings) and none on biases / norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{type(model).__name__}: no parameters with requires_grad=True to train")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _resume_dir(run_dir: Path) -> Path | None:
    last = run_dir / "last"
    if (last / "config.json").is_file():
        return last
    # save_checkpoint moves the previous checkpoint to last.old before renaming the new one into place;
    # a kill between the two renames leaves only last.old, which is still a complete checkpoint.
    old = run_dir / "last.old"
    if (old / "config.json").is_file():
        return old
    return None


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _check_same_run(saved: dict[str, Any], meta: dict[str, Any], where: Path) -> None:
    for key, value in meta.items():
        if key in saved and saved[key] != _json_roundtrip(value):
            raise CheckpointError(
                f"{where}: written for a different run — meta[{key!r}] was {saved[key]!r}, now "
                f"{_json_roundtrip(value)!r}. Delete {where} (or use another run_dir) to start over."
            )


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _batch_rows(batch: dict[str, Any]) -> int:
    for v in batch.values():
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    return 0


def micro_batches(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """`batch` split into n equal parts along dim 0 (tensors with a batch dimension; other values shared)."""
    if n == 1:
        return [batch]
    rows = _batch_rows(batch)
    if rows % n:
        raise ValueError(
            f"accum_steps={n}: a batch of {rows} rows (per process) does not split into {n} equal micro-batches"
        )
    parts: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in batch.items():
        pieces = value.split(rows // n) if torch.is_tensor(value) and value.dim() > 0 else [value] * n
        for part, piece in zip(parts, pieces, strict=True):
            part[key] = piece
    return parts


def accumulate_gradients(
    loss_module: nn.Module,
    batch: dict[str, Any],
    accum_steps: int,
    seed_of: Callable[[int], int],
    use_amp: bool,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward and backward over the micro-batches of `batch` into the parameters' .grad (which the caller
    zeroed); returns the batch's loss (mean of the micro-batch losses, detached) and its logs (their means).

    Micro-batch m (when accum_steps > 1) first re-seeds the global RNG with seed_of(m); under DDP all but the
    last run inside no_sync, so the gradient is all-reduced once, after the last backward."""
    parts = micro_batches(batch, accum_steps)
    total: torch.Tensor | None = None
    sums: dict[str, float] = {}
    for m, part in enumerate(parts):
        if accum_steps > 1:
            torch.manual_seed(seed_of(m))
        last = m + 1 == len(parts)
        sync = (
            contextlib.nullcontext()
            if last or not isinstance(loss_module, nn.parallel.DistributedDataParallel)
            else loss_module.no_sync()
        )
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        with sync:
            with autocast:
                loss, logs = loss_module(part)
            (loss / accum_steps if accum_steps > 1 else loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
        for k, v in logs.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    assert total is not None
    if accum_steps == 1:
        return total, sums
    return total / accum_steps, {k: v / accum_steps for k, v in sums.items()}


def fit(
    model: nn.Module,
    batches: Callable[[int], Iterator[dict[str, torch.Tensor]]],
    cfg: TrainConfig,
    run_dir: Path,
    meta: dict[str, Any],
    log_path: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `model` for cfg.steps optimizer steps, resuming from run_dir/last if it exists.

    `log_path`: the dvclive directory of the per-step curves (pipeline/live.py: loss, lr, grad_norm,
    items_per_s, seconds and the model's logs, every cfg.log_every steps); None logs nothing.

    `meta` (JSON-able, e.g. {"kind": "gpt", "config": asdict(model_cfg)}) is stored with every checkpoint;
    a resume refuses a checkpoint whose stored meta disagrees on any of these keys. Returns a summary:
    steps, start_step, steps_run, final_loss, seconds, items_per_s, world_size, checkpoint.
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.device)
    created_group = init_distributed(device)
    rank, world = rank_world()
    use_amp = use_bf16(cfg.amp, device)

    model.to(device)
    model.train()
    optimizer = build_optimizer(model, cfg)

    start, last_loss = 0, float("nan")
    resume = _resume_dir(run_dir)
    if resume is not None:
        state, saved, opt_state = load_checkpoint(resume, map_location=str(device), with_optimizer=True)
        _check_same_run(saved, meta, resume)
        model.load_state_dict(state)
        optimizer.load_state_dict(opt_state)
        start, last_loss = int(saved["step"]), float(saved.get("last_loss", float("nan")))
        if start > cfg.steps:
            raise CheckpointError(f"{resume}: already at step {start}, beyond TrainConfig.steps={cfg.steps}")
    if world > 1:
        # Every rank must resume from the same step (run_dir must be shared storage).
        starts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(starts, torch.tensor([start], device=device))
        if len({int(s) for s in starts}) != 1:
            raise CheckpointError(f"{run_dir}: ranks found different resume steps {[int(s) for s in starts]}")

    loss_module: nn.Module = _LossModule(model)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.find_unused_parameters,
        )
    log = StepLog(log_path, start) if (log_path is not None and rank == 0) else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
    after_step = getattr(model, "after_optimizer_step", None)

    t_start = time.perf_counter()
    items_total = 0
    it = batches(start)
    bar = tqdm(
        total=cfg.steps, initial=start, unit="step", disable=not progress or rank != 0, dynamic_ncols=True
    )
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        torch.manual_seed(derive_seed(cfg.seed, step, rank))
        lr = lr_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        try:
            batch = _to_device(next(it), device)
        except StopIteration:
            raise ValueError(
                f"batches({start}) ran out at step {step}; it must yield up to {cfg.steps}"
            ) from None

        optimizer.zero_grad(set_to_none=True)
        loss, logs = accumulate_gradients(
            loss_module,
            batch,
            cfg.accum_steps,
            lambda m, step=step: derive_seed(cfg.seed, step, rank * cfg.accum_steps + m),
            use_amp,
            device,
        )
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        # One host sync per step: loss, grad norm and the model's logs, averaged over ranks, checked before
        # the update so that a bad step never reaches the weights or the checkpoint.
        log_names = sorted(logs)
        check = torch.cat(
            [
                torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)]),
                torch.tensor([float(logs[k]) for k in log_names], device=loss.device),
            ]
        )
        if world > 1:
            dist.all_reduce(check)
            check /= world
        loss_value, norm_value, *log_values = check.tolist()
        logs = dict(zip(log_names, log_values, strict=True))
        if not math.isfinite(loss_value):
            raise TrainingStopped(
                f"non-finite loss ({loss_value}) at step {step} (lr {lr:.3g}); the last good checkpoint is "
                f"{run_dir / 'last'} — lower the lr, raise warmup_steps, or check the batch of step {step}"
            )
        if not math.isfinite(norm_value):
            raise TrainingStopped(
                f"non-finite gradient norm ({norm_value}) at step {step} (loss {loss_value:.4g})"
            )
        optimizer.step()
        if after_step is not None:
            after_step(step)

        last_loss = loss_value
        rows = _batch_rows(batch) * world
        items_total += rows
        dt = time.perf_counter() - t0
        if log is not None and (step % cfg.log_every == 0 or step + 1 == cfg.steps):
            row = {"loss": loss_value, "lr": lr, "grad_norm": norm_value, "items_per_s": rows / dt}
            log.write(step, row | {"seconds": dt, **logs})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", items_s=f"{rows / dt:.1f}", refresh=False)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            if rank == 0:
                ckpt_meta = {**meta, "step": step + 1, "last_loss": loss_value, "train": asdict(cfg)}
                save_checkpoint(run_dir / "last", model.state_dict(), ckpt_meta, optimizer.state_dict())
            if world > 1:
                dist.barrier()  # nobody runs ahead of (or returns before) the checkpoint on disk
    bar.close()
    if log is not None:
        log.close()
    seconds = time.perf_counter() - t_start
    summary = {
        "steps": cfg.steps,
        "start_step": start,
        "steps_run": cfg.steps - start,
        "final_loss": last_loss,
        "seconds": seconds,
        "items_per_s": items_total / seconds if seconds > 0 else 0.0,
        "world_size": world,
        "checkpoint": str(run_dir / "last"),
    }
    if created_group:
        dist.destroy_process_group()
    return summary
