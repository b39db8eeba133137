"""Stage `train_vq`: the pixel VQ tokenizer — trained on the image shards, or imported from a pretrained
taming/MAGE VQGAN checkpoint (`train_vq.vqgan`). Reports val reconstruction PSNR and codebook usage."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.io import atomic_dir
from pipeline.models.vq import VQConfig, VQModel, codebook_usage, psnr, vq_meta
from pipeline.pixel_vq import import_vqgan, load_pixel_vq, to_model_range
from pipeline.runs import train_and_promote
from pipeline.shards import iter_samples, list_shards
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import ShardStream
from pipeline.train import rank_world

log = logging.getLogger("digit.train_vq")
PATHS = {
    "images": "data/images",
    "out": "models/vq",
    "curves": "reports/curves/train_vq",  # dvclive directory (pipeline/live.py)
    "metrics": "metrics/train_vq.json",
}


def vq_config(params: Params) -> VQConfig:
    p = params.train_vq
    return VQConfig(
        channels=p.channels,
        channel_mult=p.channel_mult,
        stem=p.stem,
        num_res_blocks=p.num_res_blocks,
        codebook_size=p.codebook_size,
        codebook_dim=p.codebook_dim,
        beta=p.beta,
        ema_decay=p.ema_decay,
        restart_unused_steps=p.restart_unused_steps,
        rec_loss=p.rec_loss,
        seed=params.train_vq.train.seed,
    )


@torch.inference_mode()
def evaluate_vq(
    model: torch.nn.Module, images_dir: str | Path, limit: int = 512, batch: int = 64
) -> dict[str, Any]:
    """Val reconstruction PSNR (dB, on [-1, 1] images) and codebook usage of the first `limit` val images."""
    images = []
    for s in iter_samples(list_shards(images_dir, "val")):
        images.append(s["png"])
        if len(images) == limit:
            break
    x = to_model_range(np.stack(images))
    psnrs, ids = [], []
    for i in range(0, len(x), batch):
        xb = x[i : i + batch]
        idx = model.encode(xb)
        psnrs.append(float(psnr(model.decode(idx), xb)) * len(xb))
        ids.append(idx)
    ids_all = torch.cat(ids)
    used, perplexity = codebook_usage(ids_all, model.codebook_size)
    return {
        "val_psnr_db": sum(psnrs) / len(x),
        "val_codebook_used": used,
        "val_perplexity": perplexity,
        "codebook_size": model.codebook_size,
        "token_grid": list(ids_all.shape[1:]),
        "val_images": len(x),
    }


def run(
    params: Params,
    images: str = PATHS["images"],
    out: str = PATHS["out"],
    curves: str | None = PATHS["curves"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    p = params.train_vq
    if p.vqgan:
        log.info("train_vq: importing pretrained VQGAN %s", p.vqgan)
        with atomic_dir(out) as tmp:
            import_vqgan(p.vqgan, Path(tmp) / "ckpt")
            for f in (Path(tmp) / "ckpt").iterdir():
                f.rename(Path(tmp) / f.name)
            (Path(tmp) / "ckpt").rmdir()
        summary: dict[str, Any] = {"imported": p.vqgan}
    else:
        cfg = vq_config(params)
        model = VQModel(cfg)
        rank, world = rank_world()
        stream = ShardStream(
            list_shards(images, "train"), {"image": "png"}, p.train.batch_size, p.train.seed, rank, world
        )

        def batches(start: int):
            for b in stream.batches(start):
                yield {"image": to_model_range(b["image"])}

        log.info(
            "train_vq: %d train images, %d steps of %d", stream.epoch_size, p.train.steps, p.train.batch_size
        )
        fit = train_and_promote(model, batches, p.train, params.base.device, out, vq_meta(cfg), curves)
        summary = {
            "final_loss": fit["final_loss"],
            "train_seconds": fit["seconds"],
            "images_per_s": fit["items_per_s"],
            "steps": fit["steps"],
        }
    summary.update(evaluate_vq(load_pixel_vq(out), images))
    log.info(
        "train_vq: val PSNR %.2f dB, codebook used %.0f%%",
        summary["val_psnr_db"],
        100 * summary["val_codebook_used"],
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    return stage_main("train_vq", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
