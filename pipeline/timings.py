"""Per-stage wall times of the last run, from the `seconds` every stage writes into metrics/<stage>.json."""

from __future__ import annotations

import json
from pathlib import Path


def stage_times(metrics_dir: str | Path = "metrics") -> list[tuple[str, float]]:
    """(stage, seconds) for every metrics file with a `seconds` figure, in the order the files were written
    (for a `dvc repro` that is the order the stages ran)."""
    directory = Path(metrics_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no metrics directory (run `dvc repro` first)")
    rows = []
    for path in sorted(directory.glob("*.json"), key=lambda p: (p.stat().st_mtime_ns, p.name)):
        try:
            seconds = json.loads(path.read_text()).get("seconds")
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if isinstance(seconds, int | float):
            rows.append((path.stem, float(seconds)))
    return rows


def format_times(rows: list[tuple[str, float]]) -> str:
    """A small text table with a total line."""
    width = max([len(name) for name, _ in rows] + [5])
    lines = [f"{'stage':<{width}}  {'seconds':>8}"]
    lines += [f"{name:<{width}}  {s:>8.1f}" for name, s in rows]
    total = sum(s for _, s in rows)
    lines.append(f"{'total':<{width}}  {total:>8.1f}  ({total / 60:.1f} min in stages)")
    return "\n".join(lines)
