"""`digit inspect PATH`: recognise a pipeline artifact, print a summary and write a picture of it.

Each artifact kind registers a detector and a view; the first detector that accepts the path wins.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.viz import image_grid, save_png


@dataclass(frozen=True)
class View:
    kind: str
    detect: Callable[[Path], bool]
    show: Callable[[Path, Path], str]  # (artifact, reports dir) -> printable summary


VIEWS: list[View] = []


def register(kind: str, detect: Callable[[Path], bool]) -> Callable:
    def deco(fn: Callable[[Path, Path], str]) -> Callable[[Path, Path], str]:
        VIEWS.append(View(kind, detect, fn))
        return fn

    return deco


def inspect_artifact(path: str | Path, reports: str | Path = "reports/inspect") -> str:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    for view in VIEWS:
        if view.detect(path):
            return f"[{view.kind}] {path}\n" + view.show(path, Path(reports))
    kinds = ", ".join(v.kind for v in VIEWS)
    raise ValueError(f"{path}: not a recognised pipeline artifact (known kinds: {kinds})")


def _slug(path: Path) -> str:
    return "_".join(p for p in path.resolve().parts[-2:] if p not in ("/",)).replace(".", "_")


# --- image shards -------------------------------------------------------------------------------------


def _is_image_dir(p: Path) -> bool:
    return p.is_dir() and (p / "manifest.parquet").is_file()


def _shard_fields(p: Path, members: int = 8) -> set[str]:
    """Field extensions of the first sample(s) of a tar shard ("" if not a tar)."""
    import tarfile

    if not (p.is_file() and p.suffix == ".tar"):
        return set()
    with tarfile.open(p) as tf:
        names = [m.name for _, m in zip(range(members), tf, strict=False)]
    return {n.split(".", 1)[1] for n in names if "." in n}


def _is_image_shard(p: Path) -> bool:
    fields = _shard_fields(p)
    return "png" in fields and not any(f.endswith("npy") for f in fields)


@register("image shards", lambda p: _is_image_dir(p) or _is_image_shard(p))
def show_image_shards(path: Path, reports: Path, per_class: int = 8) -> str:
    from pipeline.prepare import manifest_classes, read_manifest
    from pipeline.shards import iter_samples

    if path.is_dir():
        table = read_manifest(path)
        classes = manifest_classes(table)
        rows = table.select(["split", "label", "w", "h", "shard"]).to_pylist()
        shards = sorted({(r["split"], r["shard"]) for r in rows})
        first_split = "val" if any(s == "val" for s, _ in shards) else shards[0][0]
        sample_shards = [path / name for split, name in shards if split == first_split]
    else:
        classes, rows, sample_shards, first_split = [], [], [path], path.name.split("-")[0]
    examples: dict[int, list[np.ndarray]] = defaultdict(list)
    sizes: Counter = Counter()
    seen = Counter()
    for s in iter_samples(sample_shards):
        label = s["cls"]
        seen[label] += 1
        sizes[s["png"].shape[:2]] += 1
        if len(examples[label]) < per_class:
            examples[label].append(s["png"])
        if rows and all(len(examples[c]) >= per_class for c in range(len(classes))):
            break
    if not rows:  # a lone shard: count what it holds
        rows = [
            {"split": first_split, "label": k, "w": None, "h": None}
            for k, n in seen.items()
            for _ in range(n)
        ]
    name = lambda c: classes[c] if c < len(classes) else str(c)  # noqa: E731
    lines = []
    counts = Counter((r["split"], r["label"]) for r in rows)
    for split in sorted({r["split"] for r in rows}, key=lambda s: (s != "train", s)):
        total = sum(n for (sp, _), n in counts.items() if sp == split)
        per = ", ".join(
            f"{name(c)}={counts[(split, c)]}" for c in sorted({c for sp, c in counts if sp == split})
        )
        lines.append(f"{split}: {total} images — {per}")
    lines.append("stored image size (H×W): " + ", ".join(f"{h}×{w}" for (h, w) in sizes))
    src_sizes = Counter((r["w"], r["h"]) for r in rows if r.get("w"))
    if src_sizes:
        common = ", ".join(f"{w}×{h} ({n})" for (w, h), n in src_sizes.most_common(3))
        lines.append(f"source sizes (W×H), most common: {common}")
    labels = sorted(examples)
    grid = image_grid(
        [examples[c] for c in labels], [name(c) for c in labels], title=f"{path.name}: {first_split}"
    )
    out = save_png(grid, reports / f"{_slug(path)}_grid.png")
    lines.append(f"picture: {out}")
    return "\n".join(lines)
