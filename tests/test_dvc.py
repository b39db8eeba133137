"""Real DVC on a copy of the project: reruns only what a param change touches; the Prefect flow on a Dask
cluster writes what `dvc repro` wrote; dvclive curves render in `dvc plots show`; a local-directory remote
round trip (push, clone, pull) leaves `dvc repro` nothing to do."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.flow import LOCAL_CLUSTER, digit_flow, read_dag
from pipeline.live import read_curves

from .conftest import REPO, run_module

pytestmark = pytest.mark.slow

# The prefix of the DAG the shared project runs: tokenize and every stage it depends on, on tiny params.
TARGET = "tokenize"
TINY = {
    "base": {"image_size": 32, "threads": 1},  # one torch thread in `dvc repro` and in the flow alike
    "prepare": {"train_size": 20, "val_size": 6, "shard_size": 10},
    "pretrain_encoder": {
        **{"embed_dim": 32, "depth": 3, "num_heads": 2, "out_dim": 64, "head_hidden_dim": 32},
        **{"head_bottleneck_dim": 16, "patch_out_dim": 64, "local_crops": 2, "local_crop_size": 16},
        **{"steps": 3, "batch_size": 8, "warmup_steps": 1, "warmup_teacher_temp_steps": 2},
        "collapse_warmup_steps": 100,
    },
    "kmeans": {"k": 8, "sample_patches": 320},
    "train_vq": {
        **{"channels": 8, "codebook_size": 16, "codebook_dim": 4},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
    },
}


def _run(cwd, *args, stdout_only: bool = False):
    return run_module(cwd, *args, timeout=600, stdout_only=stdout_only)


def _json(cwd, *args):
    return json.loads(_run(cwd, *args, "--json", stdout_only=True))


def _git(cwd, *args) -> str:
    ident = ["-c", "user.name=digit tests", "-c", "user.email=tests@digit.invalid"]
    r = subprocess.run(
        ["git", *ident, *args], cwd=cwd, check=True, capture_output=True, text=True, timeout=120
    )
    return r.stdout


def _merge(params, updates):
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict):
            _merge(params[key], value)
        else:
            params[key] = value
    return params


def make_project(root: Path, updates: dict) -> Path:
    """A git + DVC repo holding the pipeline's code, dvc.yaml, .gitignore and params.yaml with `updates`."""
    root.mkdir()
    for name in ("pipeline", "stages", "published"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), updates)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    _run(root, "dvc", "init", "-q")
    _run(root, "dvc", "config", "core.analytics", "false")
    return root


def prefix(target: str) -> list[str]:
    """`target` and the stages it depends on, in dvc.yaml order."""
    dag = {s.id: s for s in read_dag(REPO / "dvc.yaml")}
    needed, todo = set(), [target]
    while todo:
        sid = todo.pop()
        if sid not in needed:
            needed.add(sid)
            todo.extend(dag[sid].upstream)
    return [sid for sid in dag if sid in needed]


def cached_outs(project: Path) -> dict[str, list[str]]:
    """The cached outputs (data, models) of each stage that ran — not its metrics and curves."""
    ran = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    outs = {}
    for name, st in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items():
        if name in ran:
            entries = [(o, {}) if isinstance(o, str) else next(iter(o.items())) for o in st.get("outs") or []]
            outs[name] = [path for path, opts in entries if opts.get("cache", True)]
    return outs


def files_of(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def project(tmp_path):
    return make_project(
        tmp_path / "proj",
        {"base": {"image_size": 32}, "prepare": {"train_size": 20, "val_size": 6, "shard_size": 10}},
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The tiny project after `dvc repro tokenize`, committed to git as a user would (dvc.lock, metrics and
    curves are Git's; data and models DVC's)."""
    proj = make_project(tmp_path_factory.mktemp("chain") / "proj", TINY)
    out = _run(proj, "dvc", "repro", TARGET)
    for stage in prefix(TARGET):
        assert f"Running stage '{stage}'" in out
    _git(proj, "add", "-A")
    _git(proj, "commit", "-qm", "dvc repro")
    return proj


@pytest.fixture(scope="module")
def dask_address():
    """One LocalCluster of 2 worker processes for the module, as `digit flow --runner dask` starts one."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, **LOCAL_CLUSTER) as cluster:
        yield cluster.scheduler_address


def test_repro_prepare_is_cached_and_param_change_reruns_it(project):
    first = _run(project, "dvc", "repro", "prepare")
    assert "Running stage 'prepare'" in first
    assert sorted(p.name for p in (project / "data/images").iterdir())[:2] == [
        "manifest.parquet",
        "skipped.csv",
    ]
    second = _run(project, "dvc", "repro", "prepare")
    assert "Running stage" not in second and "didn't change" in second

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["prepare"]["train_size"] = 30
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(project, "dvc", "status", "prepare")
    assert "prepare" in status and "prepare.train_size" in status
    # a knob that only changes how the work is done (not what it produces) is not a dependency
    params["prepare"]["workers"] = 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert "prepare.workers" not in _run(project, "dvc", "status", "prepare")
    third = _run(project, "dvc", "repro", "prepare")
    assert "Running stage 'prepare'" in third
    assert _run(project, "dvc", "status", "prepare").strip().endswith("Data and pipelines are up to date.")


def test_flow_on_a_dask_cluster_writes_what_dvc_repro_wrote(chain, dask_address, tmp_path, monkeypatch):
    flow_proj = tmp_path / "flow"
    shutil.copytree(chain, flow_proj, symlinks=True)
    outs = cached_outs(flow_proj)
    stages = prefix(TARGET)
    for stage in stages:
        for out in outs[stage]:
            shutil.rmtree(flow_proj / out)
    shutil.rmtree(flow_proj / "metrics")
    shutil.rmtree(flow_proj / "reports")
    monkeypatch.chdir(flow_proj)
    threads = torch.get_num_threads()
    try:  # one flow, every stage's shards on the Dask workers
        digit_flow("params.yaml", stages, runner="dask", address=dask_address)
    finally:
        torch.set_num_threads(threads)

    for stage in stages:
        for out in outs[stage]:
            assert files_of(flow_proj / out) == files_of(chain / out), f"{stage}: {out}"
    # DVC judges the flow's outputs: only the metrics and curves (wall times in them) differ from dvc.lock
    status = _json(flow_proj, "dvc", "status", "--with-deps", TARGET)
    changed = {
        path
        for entries in status.values()
        for entry in entries
        if isinstance(entry, dict)
        for path in entry.get("changed outs", {})
    }
    data = {out for stage in stages for out in outs[stage]}
    assert changed and not changed & data, status
    assert all(p.startswith(("metrics/", "reports/curves/")) for p in changed), status


def test_dvclive_curves_in_dvc_plots_metrics_and_exp_show(chain, tmp_path):
    rows = read_curves(chain / "reports/curves/train_vq")
    assert [r["step"] for r in rows] == [0, 1, 2] and {"loss", "lr", "psnr"} <= set(rows[0])
    summary = json.loads((chain / "reports/curves/train_vq/metrics.json").read_text())
    assert summary["step"] == 2 and summary["loss"] == rows[-1]["loss"]

    _run(chain, "dvc", "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots/index.html").read_text()
    for name in ("loss", "psnr", "grad_norm"):
        assert f'"text": "reports/curves/train_vq/plots/metrics/{name}.tsv"' in html, name
    assert '"text": "reports/curves/pretrain_encoder/plots/metrics/loss.tsv"' in html
    for r in rows:  # every logged step is in the rendered data
        assert f'{{"step": "{r["step"]}", "psnr": "{r["psnr"]!r}", "rev": "workspace"}}' in html

    shown = _json(chain, "dvc", "metrics", "show")[""]["data"]
    assert shown["reports/curves/train_vq/metrics.json"]["data"]["step"] == 2
    assert "val_psnr_db" in shown["metrics/train_vq.json"]["data"]

    # the experiments table: the committed run, with the dvclive summary among its metrics
    (head,) = [row for row in _json(chain, "dvc", "exp", "show") if row["rev"] != "workspace"]
    assert head["data"]["metrics"]["reports/curves/train_vq/metrics.json"]["data"]["step"] == 2


def test_remote_push_clone_pull_then_repro_has_nothing_to_do(chain, tmp_path):
    remote = tmp_path / "remote"
    _run(chain, "dvc", "remote", "add", "--default", "--force", "local", str(remote))
    _git(chain, "commit", "-qam", "a local-directory remote")
    assert "pushed" in _run(chain, "dvc", "push")
    assert any(remote.rglob("*")), "nothing reached the remote"

    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(chain), str(clone))
    assert not (clone / "data/images").exists() and (clone / "metrics/tokenize.json").is_file()
    _run(clone, "dvc", "pull", "--with-deps", TARGET)
    repro = _run(clone, "dvc", "repro", TARGET)
    assert "Running stage" not in repro, repro
    for stage in prefix(TARGET):
        assert f"Stage '{stage}' didn't change, skipping" in repro
    assert _json(clone, "dvc", "status", "--with-deps", TARGET) == {}
    for out in cached_outs(chain)[TARGET]:
        assert files_of(clone / out) == files_of(chain / out)
