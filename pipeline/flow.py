"""The same stages as a Prefect flow: retries, concurrent stages and per-shard tasks, a UI when a server is set.

The DAG is read from dvc.yaml (stages, matrix variants, and which stage's outs another stage depends on),
so there is one definition of the pipeline. DVC decides what is up to date; this flow runs the stage
functions that `dvc repro` runs (paths in, paths out) and never keeps a second cache that could disagree
with DVC's: after a flow run, `dvc commit` records its outputs.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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


@dataclass
class StageSpec:
    id: str  # as DVC names it: "train_gpt@digit"
    module: str  # "stages.train_gpt"
    variant: str | None
    deps: list[str]
    outs: list[str]
    upstream: list[str] = field(default_factory=list)


def _paths(entries: list[Any] | None) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def read_dag(dvc_yaml: str | Path = "dvc.yaml") -> list[StageSpec]:
    """Stages of dvc.yaml in file order (which is a topological order), matrix entries expanded."""
    stages = yaml.safe_load(Path(dvc_yaml).read_text())["stages"]
    specs: list[StageSpec] = []
    for name, st in stages.items():
        variants = (st.get("matrix") or {}).get("variant") or [None]
        for v in variants:
            fill = (lambda s, v=v: s.replace("${item.variant}", v)) if v else (lambda s: s)
            cmd = fill(st["cmd"])
            module = re.search(r"-m (stages\.\w+)", cmd)
            if not module:
                raise ValueError(f"dvc.yaml: stage {name}: cmd {cmd!r} is not `python -m stages.<name>`")
            outs = [
                fill(p) for p in _paths(st.get("outs")) + _paths(st.get("metrics")) + _paths(st.get("plots"))
            ]
            specs.append(
                StageSpec(
                    f"{name}@{v}" if v else name,
                    module.group(1),
                    v,
                    [fill(p) for p in _paths(st.get("deps"))],
                    outs,
                )
            )
    produced = {o.rstrip("/"): s.id for s in specs for o in s.outs}
    for s in specs:
        s.upstream = sorted({produced[d.rstrip("/")] for d in s.deps if d.rstrip("/") in produced})
    return specs


@task(name="shard", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def shard_task(fn: Callable[[Any, Path], Any], job: Any, out_dir: Path) -> Any:
    return fn(job, out_dir)


def prefect_map(fn: Callable[[Any, Path], Any], jobs: list[Any], out_dir: Path) -> list[Any]:
    futures = shard_task.map(unmapped(fn), jobs, unmapped(out_dir))
    return [f.result() for f in futures]


@task(name="stage", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def stage_task(module_name: str, params_path: str, paths: dict[str, str]) -> dict[str, Any]:
    module = importlib.import_module(module_name)
    params = load_params(params_path)
    metrics = module.run(params, **paths, map_jobs=prefect_map)
    if paths.get("metrics"):
        write_json(paths["metrics"], metrics)
    return metrics


def stage_paths(spec: StageSpec, overrides: dict[str, str] | None = None) -> dict[str, str]:
    paths = dict(importlib.import_module(spec.module).PATHS)
    if spec.variant:
        paths["variant"] = spec.variant
    paths.update(overrides or {})
    return {k: v.format(**paths) if isinstance(v, str) else v for k, v in paths.items()}


@flow(name="digit-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def digit_flow(
    params_path: str = "params.yaml",
    stages: Sequence[str] | None = None,
    paths: dict[str, dict[str, str]] | None = None,
    dvc_yaml: str = "dvc.yaml",
) -> dict[str, dict[str, Any]]:
    """Run `stages` (DVC stage ids or names, e.g. "train_gpt" = both variants; default: all) as Prefect tasks,
    each waiting for its upstream stages only, so independent stages run concurrently. `paths` overrides a
    stage's paths, keyed by stage id."""
    dag = read_dag(dvc_yaml)
    ids = [s.id for s in dag]
    wanted = set(stages or ids)
    unknown = wanted - set(ids) - {s.id.split("@")[0] for s in dag}
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; known: {ids}")
    futures: dict[str, Any] = {}
    for spec in dag:
        if spec.id in wanted or spec.id.split("@")[0] in wanted:
            waits = [futures[u] for u in spec.upstream if u in futures]
            futures[spec.id] = stage_task.with_options(name=spec.id).submit(
                spec.module, params_path, stage_paths(spec, (paths or {}).get(spec.id)), wait_for=waits
            )
    return {sid: f.result() for sid, f in futures.items()}
