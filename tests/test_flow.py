"""The Prefect flow runs the same stage code as DVC (one ephemeral server for the session)."""

import functools

import pytest
import yaml

from pipeline.cli import main
from pipeline.flow import ShardJobsNotPicklable, check_picklable, digit_flow
from pipeline.prepare import read_manifest
from stages import prepare

from .conftest import REPO


def test_flow_runs_prepare_like_the_stage(tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(
        yaml.safe_dump(
            {"base": {"image_size": 32}, "prepare": {"train_size": 20, "val_size": 6, "shard_size": 8}}
        )
    )
    out = tmp_path / "flow_images"
    result = digit_flow(
        str(params_path),
        ["prepare"],
        {"prepare": {"out": str(out), "metrics": str(tmp_path / "prepare.json")}},
    )
    assert result["prepare"]["train_shards"] == 3 and result["prepare"]["val_images"] == 6
    assert (tmp_path / "prepare.json").is_file()
    # Shards written by concurrent Prefect tasks are byte-identical to the DVC stage's sequential ones.
    from pipeline.config import load_params

    prepare.run(load_params(params_path), out=str(tmp_path / "stage_images"))
    for shard in sorted(out.glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "stage_images" / shard.name).read_bytes()
    assert read_manifest(out).equals(read_manifest(tmp_path / "stage_images"))


def _closure_job(stage_module):
    """A stage job breaking the map_jobs contract: a closure over local state."""
    real = stage_module.run_job
    loaded = {"model": object()}

    def job(j, out_dir, progress=None):
        return real(j, out_dir) if loaded else None

    return job


def test_a_closure_job_on_dask_fails_naming_the_stage_not_a_pickling_traceback(tmp_path, monkeypatch, capsys):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(
        yaml.safe_dump({"base": {"image_size": 32}, "prepare": {"train_size": 8, "val_size": 2}})
    )
    out = tmp_path / "images"
    monkeypatch.setattr(prepare, "run_job", _closure_job(prepare))
    paths = {"prepare": {"out": str(out), "metrics": str(tmp_path / "m.json")}}
    # The check runs before anything is sent: no cluster is started for it.
    with pytest.raises(
        ShardJobsNotPicklable, match=r"stage 'prepare': its job function .*job cannot be sent"
    ):
        digit_flow(str(params_path), ["prepare"], paths, runner="dask", address="tcp://127.0.0.1:1")
    assert not out.exists() and not (tmp_path / "images.tmp").exists()
    # the CLI: one clear line, exit status 2
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    code = main(
        [
            "flow",
            "--params",
            str(params_path),
            "--stages",
            "prepare",
            "--runner",
            "dask",
            "--address",
            "tcp://127.0.0.1:1",
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and err.startswith("error: stage 'prepare': its job function")
        and "map_jobs contract" in err
    )
    assert "Traceback" not in err


def test_check_picklable_accepts_the_contract_and_names_the_bad_job():
    check_picklable("prepare", prepare.run_job, [1, (2, "b")])  # a module-level function, plain jobs
    check_picklable("x", functools.partial(prepare.run_job, progress=None), [1, "a"])
    with pytest.raises(ShardJobsNotPicklable, match=r"stage 'sample@digit': its job 1 cannot be sent"):
        check_picklable("sample@digit", prepare.run_job, [1, lambda: 0])


def test_flow_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"runner: expected one of \['threads', 'dask'\]"):
        digit_flow(runner="ray")
    with pytest.raises(ValueError, match=r"gpu_stages: unknown stage\(s\) \['nope'\]"):
        digit_flow(runner="dask", gpu_stages=["nope"], dvc_yaml=str(REPO / "dvc.yaml"))
    with pytest.raises(ValueError, match="gpu_stages: a LocalCluster's workers advertise no GPU"):
        digit_flow(runner="dask", gpu_stages=["sample"], dvc_yaml=str(REPO / "dvc.yaml"))
    with pytest.raises(ValueError, match="worker resources are a Dask feature"):
        digit_flow(gpu_stages=["sample"], dvc_yaml=str(REPO / "dvc.yaml"))
