"""Stage logging through dvclive, so `dvc plots show`, `dvc metrics show`, `dvc exp show` and `dvc exp diff`
read what the stages write the way DVC users expect.

A stage's live directory (dvclive's layout):
    <dir>/plots/metrics/<name>.tsv   per-step curves, columns `step` and `<name>` (training stages)
    <dir>/plots/custom/<name>.json   final plots: a list of rows (evaluation stages, `log_results`)
    <dir>/plots/images/<name>        pictures
    <dir>/metrics.json               the summary: last value of every curve and the final figures

dvc.yaml declares these as the stage's `plots:` / `metrics:`: dvclive here never edits dvc.yaml and never
creates experiments on its own; `dvc repro` and `dvc exp run` own the run (see StageLive below).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.io import atomic_dir

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CURVES_DIR = Path("plots") / "metrics"


def _live(directory: str | Path, resume: bool):
    from dvclive import Live

    class StageLive(Live):
        """dvclive's files without its own Git/DVC integration (finding the repo, naming an experiment,
        writing dvc.yaml, DVC Studio via the repo's config): `dvc repro` / `dvc exp run` own the run and
        dvc.yaml declares the files. That integration also fails in a Git repo without commits
        (dvclive 3.49 raises SCMError there, e.g. on the first `dvc repro` of a fresh repo)."""

        def _init_dvc(self) -> None:
            self._dvc_file = "dvc.yaml"  # never written: dvcyaml=None

    return StageLive(str(directory), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None)


def _curve_files(directory: Path) -> list[Path]:
    root = directory / CURVES_DIR
    return sorted(root.rglob("*.tsv")) if root.is_dir() else []


def _truncate(path: Path, start_step: int) -> None:
    """Keep the header and the rows of steps < start_step; written to a sibling and renamed."""
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows:
        return
    step_col = rows[0].index("step")
    kept = [r for r in rows[1:] if r and int(r[step_col]) < start_step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        csv.writer(f, delimiter="\t", lineterminator=os.linesep).writerows([rows[0], *kept])
    os.replace(tmp, path)


class StepLog:
    """Per-step training curves in a dvclive directory; `fit` writes one row per logged step.

    A fresh run (start_step 0) clears what an earlier run left there. A resumed run first drops the rows of
    steps >= start_step (logged after the checkpoint it resumes from, by the run that was killed), so the
    curves of a killed and resumed run equal those of an uninterrupted one. The summary (metrics.json) is
    rebuilt from the rows logged after the resume: every row carries every curve.
    """

    def __init__(self, directory: str | Path, start_step: int) -> None:
        self.directory = Path(directory)
        resume = start_step > 0
        if resume:
            for path in _curve_files(self.directory):
                _truncate(path, start_step)
            (self.directory / METRICS_FILE).unlink(missing_ok=True)  # a kill may have left it half-written
        self.live = _live(self.directory, resume)

    def write(self, step: int, row: Mapping[str, float]) -> None:
        self.live.step = step
        for name, value in row.items():
            self.live.log_metric(name, value)
        # make_summary, not next_step: next_step also re-reads every curve file (for DVC Studio) each step
        self.live.make_summary()

    def close(self) -> None:
        self.live.end()


@dataclass(frozen=True)
class Plot:
    """A final (not per-step) plot: rows of one x and one or more y columns, e.g. probe top-1 per block.
    Only the rows are written; its axes, title and template belong in the plot's dvc.yaml entry."""

    rows: Sequence[Mapping[str, Any]]
    x: str
    y: str | list[str]

    def __post_init__(self) -> None:
        ys = [self.y] if isinstance(self.y, str) else list(self.y)
        for i, row in enumerate(self.rows):
            missing = [k for k in (self.x, *ys) if k not in row]
            if missing:
                raise ValueError(f"Plot: row {i} has no {missing} (it has {sorted(row)})")


def log_results(
    directory: str | Path,
    metrics: Mapping[str, Any],
    plots: Mapping[str, Plot] | None = None,
    images: Mapping[str, Any] | None = None,
) -> Path:
    """Write an evaluation stage's final figures through dvclive into `directory`, replacing it whole.

    metrics: the flat figures → `<directory>/metrics.json` (JSON-able values; non-finite floats are
    written as strings, as dvclive does). plots: name → Plot → `<directory>/plots/custom/<name>.json`.
    images: name (with its extension, e.g. "samples.png") → a PIL image, a uint8 array or an image file
    → `<directory>/plots/images/<name>`. Declare them in dvc.yaml, e.g.

        metrics: [reports/eval/fidelity/metrics.json: {cache: false}]
        plots:
          - reports/eval/probe/plots/custom/probe.json: {cache: false, x: layer, y: [digit, vq]}
          - reports/eval/probe/plots/images: {cache: false}

    Written into `<directory>.tmp` and renamed at the end, so a killed stage leaves nothing half-written.
    Returns the path of metrics.json.
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        live = _live(tmp, resume=False)
        for name, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = str(value)
            live.summary[name] = value
        for name, plot in (plots or {}).items():
            live.log_plot(name, [dict(r) for r in plot.rows], x=plot.x, y=plot.y)
        for name, image in (images or {}).items():
            live.log_image(name, image)
        live.make_summary()
    return directory / METRICS_FILE


def _number(text: str) -> float | int | str:
    try:
        value = float(text)
    except ValueError:
        return text  # dvclive writes nan/inf as text
    return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value


def read_curves(directory: str | Path) -> list[dict[str, Any]]:
    """The per-step curves of a live directory as rows {"step": int, name: value, ...}, by step.

    Raises FileNotFoundError if the directory holds no curves.
    """
    directory = Path(directory)
    files = _curve_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no curves ({CURVES_DIR}/*.tsv) — not a dvclive directory?")
    rows: dict[int, dict[str, Any]] = {}
    for path in files:
        name = path.relative_to(directory / CURVES_DIR).with_suffix("").as_posix()
        with path.open(newline="") as f:
            for r in csv.DictReader(f, delimiter="\t"):
                step = int(r["step"])
                rows.setdefault(step, {"step": step})[name] = _number(r[Path(name).name])
    return [rows[s] for s in sorted(rows)]
