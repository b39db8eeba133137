"""Atomic outputs: a stage writes into a temporary sibling and renames it at the end, so a killed
stage never leaves anything that looks finished."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | Path, keep_partial: bool = False) -> Iterator[Path]:
    """Yield `<final>.tmp` to write into; on success it replaces `final`, on error it is removed
    (or kept when `keep_partial`, for stages that resume from what they already wrote)."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists() and not keep_partial:
        _remove(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        if not keep_partial:
            _remove(tmp)
        raise
    promote(tmp, final)


def promote(src: str | Path, final: str | Path) -> None:
    """Move a finished `src` onto `final`, replacing whatever was there, with one rename at the end."""
    src, final = Path(src), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        _remove(old)
    if final.exists():
        os.replace(final, old)
    os.replace(src, final)
    if old.exists():
        _remove(old)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def sha256_file(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One hash over (name, sha256) of each file, in the given order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode() + b"\0" + sha256_file(path).encode())
    return h.hexdigest()


def write_tsv(path: str | Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    """A tab-separated table (header + rows, floats to 6 significant digits), written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter="\t", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    os.replace(tmp, path)
