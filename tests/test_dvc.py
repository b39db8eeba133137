"""Real DVC on a copy of the project: reruns only what a param change touches."""

import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import REPO

pytestmark = pytest.mark.slow


def _run(cwd, *args):
    r = subprocess.run([sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{args}: {r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.fixture
def project(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", proj)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["image_size"] = 32
    params["prepare"].update(train_size=20, val_size=6, shard_size=10)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    _run(proj, "dvc", "init", "-q")
    _run(proj, "dvc", "config", "core.analytics", "false")
    return proj


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
