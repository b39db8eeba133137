"""What every stage script shares: a CLI with --help, params validation, logging and the metrics file."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import ParamsError, load_params
from pipeline.io import write_json

log = logging.getLogger("digit")

# How a stage fans out independent per-shard work: map_jobs(fn, jobs, out_dir) -> [fn(job, out_dir) ...]
# in job order. Stages loop by default; the Prefect flow passes one that submits concurrent tasks, which may
# run in other processes or on other machines (a Dask cluster). So `fn` and `jobs` must be picklable: a
# module-level function (or a functools.partial of one over params, paths and numbers) — never a closure
# over loaded models, open stores, locks or progress bars. Heavy state is loaded inside `fn` through a
# per-process cache (functools.lru_cache keyed on paths and hashes); results are small (paths, counts).
MapJobs = Callable[[Callable[[Any, Path], Any], list[Any], Path], list[Any]]


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )


def stage_main(
    name: str,
    description: str,
    run: Callable[..., dict[str, Any]],
    paths: dict[str, str],
    argv: list[str] | None = None,
) -> int:
    """Parse `--params` and one `--<name>` option per entry of `paths`, validate params, run, write metrics.

    `run(params, **paths)` returns the flat metrics dict, which is written to the `metrics` path if the
    stage declares one. Defaults may name other options, e.g. {"variant": "digit", "out":
    "models/gpt_{variant}"}: they are filled in after parsing.
    """
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    for key, default in paths.items():
        parser.add_argument(
            f"--{key.replace('_', '-')}", dest=key, default=default, help=f"default: {default}"
        )
    args = parser.parse_args(argv)
    setup_logging()
    try:
        params = load_params(args.params)
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if params.base.threads:
        import torch

        torch.set_num_threads(params.base.threads)
    kwargs = {k: getattr(args, k) for k in paths}
    kwargs = {k: v.format(**kwargs) if isinstance(v, str) else v for k, v in kwargs.items()}
    t0 = time.perf_counter()
    metrics = run(params, **kwargs)
    metrics = {**metrics, "seconds": round(time.perf_counter() - t0, 3)}
    if kwargs.get("metrics") and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 alone
        write_json(kwargs["metrics"], metrics)
    log.info("%s done in %.1fs: %s", name, metrics["seconds"], metrics)
    return 0


def ensure_parent(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
