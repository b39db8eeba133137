"""Stage `probe`: linear probe of every block of one variant's frozen GPT (the paper's linear-probe
accuracy). Features are each block's output mean-pooled over [BOS, t1..tN], computed with no label; one
logistic-regression probe per block (full-batch L-BFGS, weight decay chosen on a held-out slice of train);
the best block is chosen on held-out train images, never on val.

Streaming: the token subsets are read shard by shard, the features of each batch are appended to one file
per block in `<live>.features/` and the probe reads them back in chunks (pipeline/metrics/probe.py), so memory
does not grow with evaluate.probe.train_images; the scratch files are removed at the end.

Writes `<variant>_probe_top1`, `_best_layer`, ... and, through dvclive, the same figures and the plot of val
top-1 per block into `reports/eval/probe_<variant>/` (plots/custom/probe.json: layer, top1).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.evaluation import iter_subset, require, write_probe_features
from pipeline.live import Plot, log_results
from pipeline.metrics.probe import ProbeConfig, probe_layers
from pipeline.models.gpt import load_gpt
from pipeline.shards import list_shards
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import read_token_meta
from pipeline.train import resolve_device
from stages.train_gpt import check_variant, fill_variant, token_spec

log = logging.getLogger("digit.probe")
PATHS = {
    "variant": "digit",
    "tokens": "data/tokens",
    "gpt": "models/gpt_{variant}",
    "live": "reports/eval/probe_{variant}",
    "metrics": "metrics/probe_{variant}.json",
}


def token_batches(
    samples: Iterator[dict[str, Any]], field: str, batch_size: int, labels: list[int]
) -> Iterator[torch.Tensor]:
    """int64 [b, h*w] token batches of a stream of samples; appends each sample's class to `labels`."""
    rows: list[np.ndarray] = []
    for s in samples:
        rows.append(np.asarray(s[field], dtype=np.int64).reshape(-1))
        labels.append(int(s["cls"]))
        if len(rows) == batch_size:
            yield torch.from_numpy(np.stack(rows))
            rows = []
    if rows:
        yield torch.from_numpy(np.stack(rows))


def run(
    params: Params,
    variant: str = PATHS["variant"],
    tokens: str = PATHS["tokens"],
    gpt: str = PATHS["gpt"],
    live: str = PATHS["live"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    check_variant(variant)
    gpt, live = fill_variant(gpt, variant), fill_variant(live, variant)
    p = params.evaluate.probe
    device = resolve_device(params.base.device)
    meta = read_token_meta(tokens)
    field, _, _ = token_spec(meta, variant)
    model = load_gpt(require(gpt, f"{variant} GPT", f"train_gpt --variant {variant}"), str(device))
    scratch = Path(live).with_name(Path(live).name + ".features")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        files, labels = {}, {}
        for split, n in (("train", p.train_images), ("val", p.val_images)):
            labels[split] = []
            samples = iter_subset(list_shards(tokens, split), n, p.seed)
            batches = token_batches(samples, field, p.batch_size, labels[split])
            files[split] = write_probe_features(model, batches, scratch, split)
        config = ProbeConfig(
            weight_decays=p.weight_decays,
            holdout_fraction=p.holdout_fraction,
            max_iter=p.max_iter,
            seed=p.seed,
            device=device.type,
        )
        log.info(
            "probe[%s]: %d blocks, %d train / %d val sequences",
            variant,
            len(files["train"]),
            len(labels["train"]),
            len(labels["val"]),
        )
        results, best = probe_layers(
            list(zip(files["train"], files["val"], strict=True)),
            np.asarray(labels["train"]),
            np.asarray(labels["val"]),
            config,
            num_classes=meta["num_classes"],
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    curve = Plot([{"layer": i + 1, "top1": r.val_top1} for i, r in enumerate(results)], x="layer", y="top1")
    m = {
        f"{variant}_probe_top1": results[best].val_top1,
        f"{variant}_probe_best_layer": best + 1,
        f"{variant}_probe_holdout_top1": results[best].holdout_top1,
        f"{variant}_probe_weight_decay": results[best].weight_decay,
        f"{variant}_probe_top1_last_layer": results[-1].val_top1,
        f"{variant}_probe_layers": len(results),
        "probe_train_images": len(labels["train"]),
        "probe_val_images": len(labels["val"]),
        "probe_seed": p.seed,
        "probe_max_iter": p.max_iter,
        "probe_chance_top1": 1.0 / meta["num_classes"],
    }
    log_results(live, m, plots={"probe": curve})
    m["seconds"] = time.perf_counter() - t0
    log.info("probe[%s]: best block %d, val top-1 %.3f", variant, best + 1, results[best].val_top1)
    return m


def main(argv: list[str] | None = None) -> int:
    return stage_main("probe", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
