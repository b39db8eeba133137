"""The whole DAG under real DVC on tiny params: a sampling knob reruns only what reads the samples — the
evaluation stages are split by what they read.

Every stage runs once in this process, in DAG order (what `dvc repro` would run, without paying a Python +
torch start-up per stage), and `dvc commit` records the result in dvc.lock; from there on it is plain DVC:
`dvc status`, then `dvc repro` runs the stale stages as subprocesses and skips the others."""

import importlib
import json
import shutil
import subprocess

import pytest
import yaml

from pipeline.flow import read_dag

from .conftest import REPO, run_module

pytestmark = pytest.mark.slow

TINY_TRAIN = {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 3}
TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "ffn_dim": 64}


def _run(cwd, *args):
    return run_module(cwd, *args)


def tiny(params: dict) -> dict:
    """params.yaml shrunk to seconds per stage (32 px, a few images, a few steps of tiny models)."""
    params["base"].update(image_size=32, threads=1)
    params["prepare"].update(train_size=24, val_size=12, shard_size=12)
    params["pretrain_encoder"].update(
        embed_dim=32, depth=3, num_heads=2, out_dim=16, head_hidden_dim=32, head_bottleneck_dim=16,
        local_crops=0, steps=2, batch_size=4, warmup_steps=1, patch_out_dim=16,
    )  # fmt: skip
    params["kmeans"].update(k=8, sample_patches=300)
    params["train_vq"].update(channels=8, codebook_size=16, codebook_dim=4, train=TINY_TRAIN)
    for stage in ("train_gpt", "train_renderer"):
        params[stage]["model"].update(TINY_MODEL)
        params[stage]["train"] = TINY_TRAIN
    params["sample"].update(n=12, batch_size=4, shard_size=8)
    params["train_judge"].update(widths=[8, 16], train=TINY_TRAIN)
    ev = params["evaluate"]
    ev["fidelity"].update(kid_subsets=5, isc_splits=2, batch_size=12)
    ev["probe"].update(train_images=20, val_images=10, max_iter=5, weight_decays=[0.01])
    ev["stability"].update(images=6, snrs_db=[20, 5], batch_size=6)
    ev["upper_bound"].update(images=8, batch_size=4)
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = tmp_path_factory.mktemp("dag") / "proj"
    proj.mkdir()
    for name in ("pipeline", "stages", "published"):
        shutil.copytree(REPO / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", proj)
    params = tiny(yaml.safe_load((REPO / "params.yaml").read_text()))
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    _run(proj, "dvc", "init", "-q")
    _run(proj, "dvc", "config", "core.analytics", "false")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(proj)
        for spec in read_dag(proj / "dvc.yaml"):
            argv = ["--variant", spec.variant] if spec.variant else []
            assert importlib.import_module(spec.module).main(argv) == 0, spec.id
    _run(proj, "dvc", "commit", "-f", "-q")
    return proj


def _stages_named(status: str) -> set[str]:
    """Stage names in `dvc status` output (lines 'name:' at the start)."""
    return {
        line[:-1] for line in status.splitlines() if line.endswith(":") and not line.startswith((" ", "\t"))
    }


def test_repro_runs_the_whole_dag_and_then_nothing(project):
    for name in ("compare", "fidelity_digit", "class_match_digit", "probe_vq", "stability", "upper_bound"):
        assert (project / "metrics" / f"{name}.json").is_file(), name
    assert "Data and pipelines are up to date." in _run(project, "dvc", "status")
    shown = _run(project, "dvc", "metrics", "show")
    assert "digit_fid_over_vq_fid" in shown and "digit_probe_top1" in shown and "upper_vq_recon_fid" in shown
    # the evaluation plots and pictures, logged through dvclive, render in `dvc plots show`
    plots = json.loads(run_module(project, "dvc", "plots", "show", "--json", stdout_only=True))["data"]
    probe = plots["Linear probe val top-1 per GPT block"][0]["content"]["data"]["values"]
    assert {row["filename"] for row in probe} == {
        f"probe_{v}/plots/custom/probe.json" for v in ("digit", "vq")
    }
    table = plots["Token change rate under pixel noise (Table 1)"][0]["content"]["data"]["values"]
    assert {row["snr_db"] for row in table} == {20.0, 5.0}
    assert any(key.endswith("upper_bounds.png") for key in plots)


def test_a_sampling_knob_reruns_sampling_and_what_reads_samples_only(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["sample"]["gpt"]["top_k"] = 3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run(project, "dvc", "status")
    assert _stages_named(status) == {"sample@digit", "sample@vq"}, status
    assert "modified:" in status and "sample" in status  # the params section the stage reads
    log = _run(project, "dvc", "repro")
    ran = {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}
    reads_samples = {"fidelity@digit", "fidelity@vq", "class_match@digit", "class_match@vq"}
    assert ran == {"sample@digit", "sample@vq", *reads_samples, "compare"}, log
    for name in ("probe@digit", "probe@vq", "stability", "upper_bound", "train_gpt@digit", "reference"):
        assert f"Stage '{name}' didn't change, skipping" in log, name
    assert "Data and pipelines are up to date." in _run(project, "dvc", "status")
