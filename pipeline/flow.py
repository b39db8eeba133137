"""The same stages as a Prefect flow: retries, per-shard tasks run in parallel — in threads, or on the worker
processes of a Dask cluster — and a UI when a Prefect server is set.

The DAG is read from dvc.yaml (stages, matrix variants, and which stage's outs another stage depends on),
so there is one definition of the pipeline. DVC decides what is up to date; this flow runs the stage
functions that `dvc repro` runs (paths in, paths out) and never keeps a second cache that could disagree
with DVC's: after a flow run, `dvc commit` records its outputs.

Stages run one after another in this process, in dvc.yaml order: they share process-wide state (torch's
seeded global RNG, its thread count), so two training stages interleaving their seeded draws in threads
would not reproduce `dvc repro`. The parallel work is a stage's shards (`map_jobs`, pipeline/stage.py):
threads of this process (runner "threads"), or Prefect tasks on Dask workers (runner "dask": a
LocalCluster of worker processes, or an existing scheduler's workers). Shard jobs run there in this
process's working directory, so relative paths mean the same thing (workers elsewhere must see the project
at the same path, e.g. on shared storage); they must follow the picklable map_jobs contract.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import pickle
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Offline and quiet unless the user configured otherwise: no telemetry, a private ephemeral server.
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # read when distributed is first imported

from prefect import flow, task, unmapped  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pipeline.config import load_params  # noqa: E402
from pipeline.io import write_json  # noqa: E402

RUNNERS = ("threads", "dask")
# The LocalCluster of `--runner dask` (with n_workers): worker processes of one thread each — a shard uses
# torch's threads, and several shards in one process would share them.
LOCAL_CLUSTER = {"threads_per_worker": 1, "processes": True}
GPU_TAG = "gpu"  # Prefect tag of the shard tasks that ask Dask for a worker resource "GPU"


class ShardJobsNotPicklable(TypeError):
    """A stage handed the Dask runner a shard job that cannot be sent to another process."""


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


@contextlib.contextmanager
def _working_dir(path: str | None) -> Iterator[None]:
    if path is None:
        yield
        return
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


@task(name="shard", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def shard_task(fn: Callable[[Any, Path], Any], job: Any, out_dir: Path, cwd: str | None = None) -> Any:
    """One shard job. `cwd`: the flow's working directory, for jobs running in another process."""
    with _working_dir(cwd):
        return fn(job, out_dir)


def prefect_map(fn: Callable[[Any, Path], Any], jobs: list[Any], out_dir: Path) -> list[Any]:
    """map_jobs on this process's threads (the flow's ThreadPoolTaskRunner)."""
    futures = shard_task.map(unmapped(fn), jobs, unmapped(out_dir))
    return [f.result() for f in futures]


def check_picklable(stage: str, fn: Callable[..., Any], jobs: Sequence[Any]) -> None:
    """Raise ShardJobsNotPicklable, naming the stage, unless `fn` and every job survive plain pickle: the
    map_jobs contract (pipeline/stage.py). Checked with pickle, not cloudpickle (which Dask would use), so a
    closure over a loaded model fails here instead of being shipped, model and all, with every job."""
    what = getattr(fn, "__qualname__", None) or repr(fn)
    for label, obj in [(f"job function {what}", fn), *((f"job {i}", j) for i, j in enumerate(jobs))]:
        try:
            pickle.dumps(obj)
        except Exception as e:  # pickle raises PicklingError, AttributeError or TypeError
            raise ShardJobsNotPicklable(
                f"stage {stage!r}: its {label} cannot be sent to a Dask worker process ({type(e).__name__}: "
                f"{e}). The map_jobs contract (pipeline/stage.py, MapJobs): a module-level job function, or "
                "a functools.partial of one over params, paths and numbers, and picklable jobs — never a "
                "closure over loaded models or open stores. Until the stage follows it, run it with "
                "`--runner threads`."
            ) from None


@dataclass
class DaskShards:
    """map_jobs over Dask workers: each job one Prefect task submitted through a DaskTaskRunner."""

    runner: Any  # prefect_dask.DaskTaskRunner, entered
    gpu_stages: frozenset[str] = frozenset()  # stage ids

    def map(self, stage: str, fn: Callable[[Any, Path], Any], jobs: list[Any], out_dir: Path) -> list[Any]:
        import dask

        check_picklable(stage, fn, jobs)
        gpu = stage in self.gpu_stages
        shard = shard_task.with_options(name=f"{stage}-shard", tags=[GPU_TAG] if gpu else [])
        # Resources are a scheduler annotation: such a task only runs on a worker started with
        # `--resources GPU=1`, one at a time per such GPU.
        annotate = dask.annotate(resources={"GPU": 1}) if gpu else contextlib.nullcontext()
        params = {"fn": fn, "out_dir": out_dir, "cwd": os.getcwd()}
        with annotate:
            futures = [self.runner.submit(shard, {**params, "job": job}) for job in jobs]
        return [f.result() for f in futures]


def dask_runner(workers: int = 2, address: str | None = None) -> Any:
    """A DaskTaskRunner: on the scheduler at `address`, else on a LocalCluster of `workers` processes."""
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    if workers < 1:
        raise ValueError(f"workers: expected >= 1 Dask worker process, got {workers}")
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster", cluster_kwargs={"n_workers": workers, **LOCAL_CLUSTER}
    )


def _api_url() -> str:
    from prefect import get_client

    return str(get_client(sync_client=True).api_url)


def _not_retried(exc_type: type[BaseException]) -> Callable[..., bool]:
    def retry(task: Any, task_run: Any, state: Any) -> bool:
        return not isinstance(state.data, exc_type)

    return retry


# The Dask shard runners of the flows running in this process, by token. A stage task gets the token, not
# the runner: task parameters must stay plain data, since they travel with every child task's context.
# Reached through functions only: the flow's and tasks' functions travel by value (cloudpickle), with the
# globals they name.
_DASK_SHARDS: dict[str, DaskShards] = {}


@contextlib.contextmanager
def _registered(shards: DaskShards) -> Iterator[str]:
    token = uuid.uuid4().hex
    _DASK_SHARDS[token] = shards
    try:
        yield token
    finally:
        del _DASK_SHARDS[token]


def _shard_map(token: str | None, stage: str) -> Callable[..., Any]:
    return prefect_map if token is None else functools.partial(_DASK_SHARDS[token].map, stage)


@task(
    name="stage",
    retries=1,
    retry_delay_seconds=5,
    cache_policy=NO_CACHE,
    retry_condition_fn=_not_retried(ShardJobsNotPicklable),  # a second try would fail the same way
)
def stage_task(
    module_name: str,
    params_path: str,
    paths: dict[str, str],
    stage_id: str | None = None,
    dask_shards: str | None = None,
) -> dict[str, Any]:
    module = importlib.import_module(module_name)
    params = load_params(params_path)
    if params.base.threads:  # as stage_main does for `dvc repro`
        import torch

        torch.set_num_threads(params.base.threads)
    metrics = module.run(params, **paths, map_jobs=_shard_map(dask_shards, stage_id or module_name))
    if paths.get("metrics"):
        write_json(paths["metrics"], metrics)
    return metrics


def stage_paths(spec: StageSpec, overrides: dict[str, str] | None = None) -> dict[str, str]:
    paths = dict(importlib.import_module(spec.module).PATHS)
    if spec.variant:
        paths["variant"] = spec.variant
    paths.update(overrides or {})
    return {k: v.format(**paths) if isinstance(v, str) else v for k, v in paths.items()}


def _selected(dag: list[StageSpec], names: Sequence[str] | None, what: str) -> set[str]:
    ids = [s.id for s in dag]
    wanted = set(names or ())
    unknown = wanted - set(ids) - {s.id.split("@")[0] for s in dag}
    if unknown:
        raise ValueError(f"{what}: unknown stage(s) {sorted(unknown)}; known: {ids}")
    return {s.id for s in dag if s.id in wanted or s.id.split("@")[0] in wanted}


@flow(name="digit-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=4), log_prints=True)
def digit_flow(
    params_path: str = "params.yaml",
    stages: Sequence[str] | None = None,
    paths: dict[str, dict[str, str]] | None = None,
    dvc_yaml: str = "dvc.yaml",
    runner: str = "threads",
    workers: int = 2,
    address: str | None = None,
    gpu_stages: Sequence[str] = (),
) -> dict[str, dict[str, Any]]:
    """Run `stages` (DVC stage ids or names, e.g. "train_gpt" = both variants; default: all) as Prefect
    tasks, in dvc.yaml order; `paths` overrides a stage's paths, keyed by stage id.

    runner "threads": shard tasks on threads of this process. "dask": shard tasks on Dask workers — a
    LocalCluster of `workers` processes, or the scheduler at `address`; shard tasks of `gpu_stages` ask for
    the worker resource GPU=1 (workers started with `dask worker ADDRESS --resources GPU=1`)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner: expected one of {list(RUNNERS)}, got {runner!r}")
    dag = read_dag(dvc_yaml)
    wanted = _selected(dag, stages, "stages") if stages else {s.id for s in dag}
    gpu = _selected(dag, gpu_stages, "gpu_stages")
    if gpu and runner != "dask":
        raise ValueError("gpu_stages: worker resources are a Dask feature; use runner 'dask'")
    if gpu and not address:
        raise ValueError(
            "gpu_stages: a LocalCluster's workers advertise no GPU; start one worker per GPU with "
            "`CUDA_VISIBLE_DEVICES=i dask worker ADDRESS --nthreads 1 --resources GPU=1` (or use "
            "dask-cuda's LocalCUDACluster with resources) and pass its scheduler's address"
        )
    results: dict[str, dict[str, Any]] = {}
    token = None
    with contextlib.ExitStack() as stack:
        if runner == "dask":
            # Shard tasks report to this flow's Prefect API (its ephemeral server too): the URL travels in
            # the settings of their serialized context; without it each worker would start its own server.
            stack.enter_context(temporary_settings(updates={PREFECT_API_URL: _api_url()}))
            shards = DaskShards(stack.enter_context(dask_runner(workers, address)), frozenset(gpu))
            token = stack.enter_context(_registered(shards))
        for spec in dag:
            if spec.id in wanted:
                future = stage_task.with_options(name=spec.id).submit(
                    spec.module, params_path, stage_paths(spec, (paths or {}).get(spec.id)), spec.id, token
                )
                results[spec.id] = future.result()
    return results
