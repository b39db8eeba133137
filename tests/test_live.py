"""pipeline/live.py: dvclive directories written by training (StepLog) and evaluation (log_results)."""

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from pipeline.live import Plot, StepLog, log_results, read_curves


def test_step_log_writes_dvclive_curves_and_a_summary(tmp_path):
    log = StepLog(tmp_path / "live", 0)
    for step in (0, 2, 4):
        log.write(step, {"loss": 1.0 / (step + 1), "lr": 0.1, "acc": step / 10})
    log.close()
    assert sorted(p.name for p in (tmp_path / "live/plots/metrics").iterdir()) == [
        "acc.tsv",
        "loss.tsv",
        "lr.tsv",
    ]
    assert (tmp_path / "live/plots/metrics/loss.tsv").read_text().splitlines()[:2] == ["step\tloss", "0\t1.0"]
    rows = read_curves(tmp_path / "live")
    assert [r["step"] for r in rows] == [0, 2, 4] and rows[1] == {
        "step": 2,
        "loss": 1 / 3,
        "lr": 0.1,
        "acc": 0.2,
    }
    assert json.loads((tmp_path / "live/metrics.json").read_text()) == {
        "step": 4,
        "loss": 0.2,
        "lr": 0.1,
        "acc": 0.4,
    }
    assert not (tmp_path / "live/dvc.yaml").exists()  # dvc.yaml declares the plots, dvclive never edits it


def test_resume_drops_rows_from_the_resume_step_and_a_fresh_run_starts_over(tmp_path):
    live = tmp_path / "live"
    log = StepLog(live, 0)
    for step in range(6):  # killed after step 5; its checkpoint was written after step 3
        log.write(step, {"loss": float(step)})
    (live / "metrics.json").write_text('{"loss": 5.0, "st')  # killed while writing the summary
    resumed = StepLog(live, 4)
    for step in range(4, 8):
        resumed.write(step, {"loss": 10.0 + step})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_curves(live)] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)] + [
        (s, 10.0 + s) for s in range(4, 8)
    ]
    assert json.loads((live / "metrics.json").read_text()) == {"step": 7, "loss": 17.0}
    fresh = StepLog(live, 0)
    fresh.write(0, {"other": 1.0})
    assert read_curves(live) == [{"step": 0, "other": 1.0}]


def test_read_curves_of_a_directory_without_curves(tmp_path):
    with pytest.raises(FileNotFoundError, match="no curves"):
        read_curves(tmp_path)


def test_log_results_writes_metrics_plots_and_images_atomically(tmp_path):
    out = tmp_path / "eval"
    probe = Plot(
        [{"layer": 1, "digit": 0.2, "vq": 0.1}, {"layer": 2, "digit": 0.3, "vq": 0.15}],
        "layer",
        ["digit", "vq"],
    )
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    path = log_results(out, {"fid": 12.5, "k": 3, "bad": float("nan")}, {"probe": probe}, {"grid.png": image})
    assert path == out / "metrics.json"
    assert json.loads(path.read_text()) == {"fid": 12.5, "k": 3, "bad": "nan"}
    assert json.loads((out / "plots/custom/probe.json").read_text()) == [dict(r) for r in probe.rows]
    with Image.open(out / "plots/images/grid.png") as im:
        assert im.size == (8, 8)
    assert not (tmp_path / "eval.tmp").exists()

    # a failure half-way leaves the previous results as they were and no temporary directory
    with pytest.raises(FileNotFoundError):
        log_results(out, {"fid": 1.0}, images={"grid.png": tmp_path / "missing.png"})
    assert json.loads(path.read_text())["fid"] == 12.5 and not (tmp_path / "eval.tmp").exists()


def test_plot_rows_must_hold_their_axes():
    with pytest.raises(ValueError, match=r"row 1 has no \['vq'\]"):
        Plot([{"layer": 1, "vq": 0.1}, {"layer": 2}], "layer", "vq")


def test_step_log_in_a_git_repo_without_commits(tmp_path, monkeypatch):
    # the first `dvc repro` of a fresh `git init`: dvclive's own Git integration raised there
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    log = StepLog("reports/curves/x", 0)
    log.write(0, {"loss": 1.0})
    log.close()
    assert read_curves(tmp_path / "reports/curves/x") == [{"step": 0, "loss": 1.0}]
