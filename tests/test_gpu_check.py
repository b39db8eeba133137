"""scripts/gpu_check.py on a machine without CUDA: the CPU part runs, then a clear message and exit status 3."""

import math
import os
import re
import subprocess
import sys

from .conftest import REPO


def test_without_cuda_the_cpu_part_runs_then_it_says_so_and_exits_3():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # no GPU, even on a GPU machine
    r = subprocess.run(
        [sys.executable, str(REPO / "scripts/gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert r.returncode == 3, r.stdout + r.stderr
    out = r.stdout
    assert "no CUDA here: the CPU part runs at --quick size" in out
    assert "data: N=8192, D=32, K=64, 5 iterations" in out
    inertia = float(re.search(r"CPU \(\d+ threads\): [\d.]+ s, inertia (\S+)", out).group(1))
    # 8192 points around 64 centres with unit-variance noise in 32 dimensions: at least ~N * D
    assert math.isfinite(inertia) and inertia > 0.9 * 8192 * 32
    assert out.rstrip().endswith("the GPU checks need a CUDA machine (`make gpu-check` there).")
    assert "CUDA is not available (" in out and "FAIL" not in out and "Traceback" not in r.stderr
