"""The same stages as a Prefect flow: retries, concurrent per-shard tasks, a UI when a server is set.

DVC decides what is up to date; this flow simply runs the stage functions that `dvc repro` runs (paths
in, paths out) in DAG order, so it never keeps a second cache that could disagree with DVC's.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Offline and quiet unless the user configured otherwise: no telemetry, a private ephemeral server.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from prefect import flow, task, unmapped  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.io import write_json  # noqa: E402

# DAG order of the stages; each is `stages.<name>` with `run(params, **PATHS, map_jobs=...)`.
STAGES: tuple[str, ...] = ("prepare",)


@task(name="shard", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def shard_task(fn: Callable[[Any, Path], Any], job: Any, out_dir: Path) -> Any:
    return fn(job, out_dir)


def prefect_map(fn: Callable[[Any, Path], Any], jobs: list[Any], out_dir: Path) -> list[Any]:
    futures = shard_task.map(unmapped(fn), jobs, unmapped(out_dir))
    return [f.result() for f in futures]


@task(name="stage", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def stage_task(name: str, params_path: str, paths: dict[str, str]) -> dict[str, Any]:
    module = importlib.import_module(f"stages.{name}")
    params = load_params(params_path)
    metrics = module.run(params, **paths, map_jobs=prefect_map)
    if paths.get("metrics"):
        write_json(paths["metrics"], metrics)
    return metrics


@flow(name="digit-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def digit_flow(
    params_path: str = "params.yaml",
    stages: Sequence[str] | None = None,
    paths: dict[str, dict[str, str]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run `stages` (default: all, in DAG order); `paths` overrides a stage's output paths."""
    selected = list(stages) if stages else list(STAGES)
    unknown = [s for s in selected if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; known: {list(STAGES)}")
    results: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        if name in selected:
            stage_paths = dict(importlib.import_module(f"stages.{name}").PATHS)
            stage_paths.update((paths or {}).get(name, {}))
            results[name] = stage_task(name, params_path, stage_paths)
    return results
