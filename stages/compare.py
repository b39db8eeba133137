"""Stage `compare`: the ratios the paper's claims are about, read from the evaluation stages' metrics —
DiGIT vs the VQ-token baseline (FID ratio, IS ratio, probe delta, change-rate ratio) and each set against
what real images reach at the same N. Lower is better for FID ratios; the paper's values are in comments."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.io import read_json
from pipeline.stage import MapJobs, stage_main

log = logging.getLogger("digit.compare")
PATHS = {"metrics_dir": "metrics", "metrics": "metrics/compare.json"}
INPUTS = (
    "fidelity_digit",
    "fidelity_vq",
    "fidelity_real",
    "probe_digit",
    "probe_vq",
    "stability",
    "upper_bound",
)


def _stage(metrics_name: str) -> str:
    """fidelity_digit -> "fidelity --variant digit" (the stage that writes metrics/<metrics_name>.json)."""
    for variant in ("digit", "vq"):
        if metrics_name.endswith(f"_{variant}"):
            return f"{metrics_name.removesuffix(f'_{variant}')} --variant {variant}"
    return metrics_name


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def targets(m: dict[str, Any]) -> dict[str, float]:
    return {
        # paper: 9.13 / 24.38 = 0.37 (unconditional, 219M)
        "digit_fid_over_vq_fid": _ratio(m["digit_fid"], m["vq_fid"]),
        "digit_is_over_vq_is": _ratio(m["digit_is"], m["vq_is"]),
        # how far each set is above what real images score at the same N (1 = indistinguishable)
        "digit_fid_over_real_fid": _ratio(m["digit_fid"], m["real_fid"]),
        "upper_fid_over_real_fid": _ratio(m["upper_digit_renderer_fid"], m["upper_real_fid"]),
        # how much of the upper bound the renderer loses over plain VQ reconstruction
        "upper_renderer_fid_over_vq_recon_fid": _ratio(
            m["upper_digit_renderer_fid"], m["upper_vq_recon_fid"]
        ),
        # paper: DiGIT 71.7 vs iGPT-L 60.3 top-1
        "probe_top1_delta": m["digit_probe_top1"] - m["vq_probe_top1"],
        # paper Table 1: DiGIT changes fewer tokens than VQ at every SNR (ratio < 1)
        "change_rate_ratio": _ratio(m["digit_mean_change_rate"], m["vq_mean_change_rate"]),
    }


def run(
    params: Params,
    metrics_dir: str = PATHS["metrics_dir"],
    metrics: str | None = None,
    map_jobs: MapJobs | None = None,
) -> dict[str, Any]:
    missing = [n for n in INPUTS if not (Path(metrics_dir) / f"{n}.json").is_file()]
    if missing:
        runs = ", ".join(f"`python -m stages.{_stage(n)}`" for n in missing)
        raise FileNotFoundError(
            f"{metrics_dir}: metrics of {', '.join(missing)} not found (run {runs} first)"
        )
    m: dict[str, Any] = {}
    for name in INPUTS:
        m |= read_json(Path(metrics_dir) / f"{name}.json")
    out = targets(m)
    log.info("compare: %s", ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    return stage_main("compare", __doc__, run, PATHS, argv)


if __name__ == "__main__":
    raise SystemExit(main())
