"""The benchmarks still run against the stages they call (at toy sizes: the figures are not checked, only
that every line a reader relies on is printed). A benchmark calls stage functions directly, so a changed
stage signature would otherwise surface only when someone runs `make bench`."""

import os
import subprocess
import sys

import pytest

from .conftest import REPO


def _run(script: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_streaming_memory_benchmark_runs_every_stage_at_n_and_4n():
    out = _run("streaming_memory.py", "--n", "40")
    for kind in ("probe", "fidelity", "judge"):
        assert f"{kind:<9} N=    40: peak RSS" in out and f"{kind:<9} N=   160: peak RSS" in out
        assert f"{kind:<9} 4N/N: RSS" in out
    assert "held in RAM (the old way)" in out


def test_gpt_sampling_benchmark_checks_its_modes_agree():
    out = _run(
        "gpt_sampling.py", "--layers", "1", "--dim", "32", "--tokens", "8", "--vocab", "16", "--batches", "2"
    )
    assert "batched and per-step drew the same tokens: True" in out
    assert "batched and recompute drew the same tokens: True" in out
    assert "False" not in out
