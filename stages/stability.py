"""Stage `stability`: the paper's Table 1 on val images — token change rate and latent cosine under Gaussian
pixel noise at each SNR of evaluate.stability.snrs_db, for the DiGIT tokenizer (encoder from params +
centroids) and the pixel VQ tokenizer. The noise is added to the images in [-1, 1] and both tokenizers see
the same noisy pixels, unclamped (see pipeline/evaluation.py).

Writes `<tokenizer>_change_rate_<snr>db`, `<tokenizer>_cosine_<snr>db`, their means, and, through dvclive,
the same figures and the table as a plot into `reports/eval/stability/` (plots/custom/stability.json:
snr_db, digit_change_rate, vq_change_rate, digit_cosine, vq_cosine).
`stability_clean_agreement` checks that the adapter is the pipeline's tokenizer: its clean tokens against
the stored token shards.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from pipeline.config import Params
from pipeline.evaluation import (
    load_images,
    read_subset,
    require,
    stack_field,
)
from pipeline.live import Plot, log_results
from pipeline.metrics.stability import stability_table
from pipeline.pixel_vq import load_pixel_vq, to_model_range
from pipeline.shards import list_shards
from pipeline.stage import MapJobs, stage_main
from pipeline.stream import read_token_meta
from pipeline.tokenizer import (
    DigitStabilityTokenizer,
    encoder_from_params,
    load_centroids,
    vq_stability_tokenizer,
)
from pipeline.train import resolve_device
from stages.train_gpt import token_spec

log = logging.getLogger("digit.stability")
PATHS = {
    "images": "data/images",
    "tokens": "data/tokens",
    "kmeans": "models/kmeans",
    "vq": "models/vq",
    "live": "reports/eval/stability",
    "metrics": "metrics/stability.json",
}
COLUMNS = ["snr_db", "digit_change_rate", "vq_change_rate", "digit_cosine", "vq_cosine"]


def snr_key(snr_db: float) -> str:
    """30.0 -> "30db", 2.5 -> "2p5db" (metric keys carry no dots)."""
    return f"{snr_db:g}".replace(".", "p").replace("-", "m") + "db"


def run(
    params: Params,
    images: str = PATHS["images"],
    tokens: str = PATHS["tokens"],
    kmeans: str = PATHS["kmeans"],
    vq: str = PATHS["vq"],
    live: str = PATHS["live"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    st = params.evaluate.stability
    device = resolve_device(params.base.device)
    real, _ = load_images(images, "val", st.images, st.seed)
    x = to_model_range(real)
    centroids, _ = load_centroids(kmeans)
    digit_tok = DigitStabilityTokenizer(encoder_from_params(params.encoder, params.base), centroids)
    vq_tok = vq_stability_tokenizer(load_pixel_vq(require(vq, "VQ model", "train_vq"), device))
    log.info("stability: both tokenizers on %d val images, SNRs %s dB", len(x), list(st.snrs_db))
    tables = {
        "digit": stability_table(digit_tok, x, st.snrs_db, st.seed, st.batch_size),
        "vq": stability_table(vq_tok, x, st.snrs_db, st.seed, st.batch_size),
    }
    field, _, _ = token_spec(read_token_meta(tokens), "digit")
    stored = stack_field(read_subset(list_shards(tokens, "val"), st.images, st.seed), field, f"{tokens}/val")
    clean = torch.cat([digit_tok(x[i : i + st.batch_size])[0] for i in range(0, len(x), st.batch_size)])
    agreement = float((clean.view(len(x), -1).numpy() == stored.reshape(len(x), -1)).mean())

    rows: list[dict[str, float]] = []
    m: dict[str, Any] = {
        "stability_images": len(x),
        "stability_seed": st.seed,
        "stability_clean_agreement": agreement,
    }
    for d, v in zip(tables["digit"], tables["vq"], strict=True):
        rows.append(
            {
                "snr_db": d["snr_db"],
                "digit_change_rate": d["change_rate"],
                "vq_change_rate": v["change_rate"],
                "digit_cosine": d["cosine"],
                "vq_cosine": v["cosine"],
            }
        )
        for name, row in (("digit", d), ("vq", v)):
            m[f"{name}_change_rate_{snr_key(d['snr_db'])}"] = row["change_rate"]
            m[f"{name}_cosine_{snr_key(d['snr_db'])}"] = row["cosine"]
    for name in ("digit", "vq"):
        m[f"{name}_mean_change_rate"] = float(np.mean([r["change_rate"] for r in tables[name]]))
        m[f"{name}_mean_cosine"] = float(np.mean([r["cosine"] for r in tables[name]]))
    log_results(live, m, plots={"stability": Plot(rows, x="snr_db", y=COLUMNS[1:])})
    m["seconds"] = time.perf_counter() - t0
    log.info(
        "stability: mean change rate digit %.3f vq %.3f",
        m["digit_mean_change_rate"],
        m["vq_mean_change_rate"],
    )
    return m


def main(argv: list[str] | None = None) -> int:
    return stage_main("stability", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
