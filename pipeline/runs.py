"""Training runs as DVC stages see them: checkpoints in `<out>.partial/` while training (so a killed run
resumes, and DVC never mistakes it for a result), the final weights promoted to `<out>/` at the end."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.checkpoint import load_checkpoint, save_checkpoint
from pipeline.config import Train
from pipeline.train import TrainConfig, fit, rank_world

log = logging.getLogger(__name__)


def train_config(t: Train, device: str) -> TrainConfig:
    return TrainConfig(
        steps=t.steps,
        accum_steps=t.accum_steps,
        lr=t.lr,
        warmup_steps=t.warmup_steps,
        warmup_init_lr=t.warmup_init_lr,
        schedule=t.schedule,
        min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay,
        betas=t.betas,
        grad_clip=t.grad_clip,
        checkpoint_every=t.checkpoint_every,
        log_every=t.log_every,
        seed=t.seed,
        amp=t.amp,
        device=device,
    )


def _same_run(partial: Path, meta: dict[str, Any]) -> bool:
    for name in ("last", "last.old"):
        cfg = partial / name / "config.json"
        if cfg.is_file():
            saved = json.loads(cfg.read_text())
            return all(saved.get(k) == json.loads(json.dumps(v)) for k, v in meta.items())
    return True  # nothing to resume from


def train_and_promote(
    model: nn.Module,
    batches: Callable[[int], Iterator[dict[str, torch.Tensor]]],
    train: Train,
    device: str,
    out: str | Path,
    meta: dict[str, Any],
    curves: str | Path | None = None,
) -> dict[str, Any]:
    """Train (resuming a same-config partial run if one exists) and write the final weights to `out`.

    `curves`: the run's dvclive directory (per-step curves and their summary; see pipeline/live.py)."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not _same_run(partial, meta):
        log.info("%s: left by a run with other settings; starting over", partial)
        shutil.rmtree(partial)
    if curves:
        Path(curves).parent.mkdir(parents=True, exist_ok=True)
    summary = fit(
        model, batches, train_config(train, device), partial, meta, Path(curves) if curves else None
    )
    if summary.get("start_step"):
        log.info("resumed from step %d", summary["start_step"])
    if rank_world()[0] != 0:
        return summary  # under torchrun, rank 0 alone writes the result
    state, saved, _ = load_checkpoint(partial / "last")
    saved.pop("optimizer", None)  # the final model needs no optimizer state
    save_checkpoint(out, state, saved)
    shutil.rmtree(partial)
    return summary
