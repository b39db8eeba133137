import json
import os

import pytest

from pipeline.cli import main
from pipeline.timings import format_times, stage_times


def write(path, data, mtime):
    path.write_text(json.dumps(data))
    os.utime(path, ns=(mtime, mtime))


def test_stage_times_in_run_order_with_a_total(tmp_path, capsys):
    write(tmp_path / "train_vq.json", {"seconds": 48.5, "val_psnr_db": 23.6}, 2_000_000_000)
    write(tmp_path / "prepare.json", {"seconds": 7.25}, 1_000_000_000)
    write(tmp_path / "eval.json", {"seconds": 30}, 3_000_000_000)
    write(tmp_path / "notes.json", {"no_seconds": 1}, 4_000_000_000)
    rows = stage_times(tmp_path)
    assert rows == [("prepare", 7.25), ("train_vq", 48.5), ("eval", 30.0)]
    text = format_times(rows)
    assert text.splitlines()[-1].split()[:2] == ["total", "85.8"]
    assert main(["times", "--metrics", str(tmp_path)]) == 0
    assert "train_vq" in capsys.readouterr().out


def test_stage_times_errors(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no metrics directory"):
        stage_times(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        stage_times(tmp_path)
    assert main(["times", "--metrics", str(tmp_path)]) == 2
    assert "bad.json" in capsys.readouterr().err
