"""`digit inspect PATH`: recognise a pipeline artifact, print a summary and write a picture of it.

Each artifact kind registers a detector and a view; the first detector that accepts the path wins.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.live import read_curves
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


# --- feature store ------------------------------------------------------------------------------------


def _is_zarr(p: Path) -> bool:
    return p.is_dir() and (p / "zarr.json").is_file() and (p / "train").is_dir()


def _sibling_images(path: Path) -> Path | None:
    cand = path.parent / "images"
    return cand if _is_image_dir(cand) else None


def _images_by_key(images_dir: Path | None, split: str, keys: list[str]) -> dict[str, np.ndarray]:
    """Look up images by key in the image shards (stops once all are found)."""
    from pipeline.shards import iter_samples, list_shards

    if images_dir is None:
        return {}
    wanted, found = set(keys), {}
    for s in iter_samples(list_shards(images_dir, split)):
        if s["__key__"] in wanted:
            found[s["__key__"]] = s["png"]
            if len(found) == len(wanted):
                break
    return found


def pca_rgb(feats: np.ndarray) -> np.ndarray:
    """Project [..., D] features on their top-3 principal components, scaled to uint8 RGB."""
    flat = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
    flat = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    proj = flat @ vt[:3].T
    lo, hi = np.percentile(proj, 1, axis=0), np.percentile(proj, 99, axis=0)
    rgb = np.clip((proj - lo) / np.maximum(hi - lo, 1e-8), 0, 1)
    return (rgb.reshape(*feats.shape[:-1], 3) * 255).astype(np.uint8)


def _upscale(grid_img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(grid_img).resize((size, size), Image.NEAREST))


def _kmeans_views(attrs: dict, images: dict[str, np.ndarray], keys: list[str], rows: list[int]) -> list:
    """The K-Means view (crop + flip) each stored feature row was computed from, remade from the attrs."""
    from pipeline.features import EXTRACT_STREAM, CropSpec, ViewPlan

    view = attrs.get("view") or {}
    if view.get("mode") != "random":
        return [images[k] for k in keys]
    crop = CropSpec(tuple(view["scale"]), tuple(view["ratio"]), bool(view["flip"]))
    plan = ViewPlan(count=1, centre=0, crop=crop, seed=int(view["seed"]), stream=EXTRACT_STREAM)
    return [plan.make(images[k], "train", r)[0] for k, r in zip(keys, rows, strict=True)]


@register("feature store", _is_zarr)
def show_features(path: Path, reports: Path, n: int = 8) -> str:
    from pipeline.features import open_features

    store = open_features(path)
    attrs = dict(store.attrs)
    lines = []
    for split in ("train", "val"):
        if split in store:
            a = store[f"{split}/patches"]
            lines.append(f"{split}: patches {a.dtype} {list(a.shape)} chunks {list(a.chunks)}")
    sample, view = attrs.get("sample"), attrs.get("view")
    if sample:
        lines.append(
            f"K-Means input: {sample['images']} of {sample['of']} train images (sample {sample['requested']}, "
            f"seed {sample['seed']})"
            + (
                f", {view['mode']} views (scale {view['scale']}, ratio {view['ratio']}, flip {view['flip']})"
                if view
                else ""
            )
        )
    keep = (
        "encoder",
        "source",
        "layer",
        "block_index",
        "img_size",
        "patch_size",
        "grid",
        "dim",
        "weights",
        "weights_sha256",
    )
    lines.append("attrs: " + ", ".join(f"{k}={attrs[k]}" for k in keep if k in attrs))
    if attrs.get("random_weights"):
        lines.append("WARNING: features of a randomly initialised encoder (tests only)")
    split = "val" if "val" in store else "train"
    feats = np.asarray(store[f"{split}/patches"][:n], dtype=np.float32)
    keys = [str(k) for k in store[f"{split}/keys"][:n]]
    h, w = attrs["grid"]
    rgb = pca_rgb(feats).reshape(len(keys), h, w, 3)
    images = _images_by_key(_sibling_images(path), split, keys)
    size = max(64, (images[keys[0]].shape[0] if images else 64))
    rows = [[_upscale(r, size) for r in rgb]]
    labels = ["PCA to RGB"]
    if images and "rows" in store[split]:
        rows.insert(0, _kmeans_views(attrs, images, keys, store[f"{split}/rows"][:n].tolist()))
        labels.insert(0, "K-Means view")
    elif images:
        rows.insert(0, [images[k] for k in keys])
        labels.insert(0, "image")
    out = save_png(
        image_grid(rows, labels, title=f"{split}: first {len(keys)} images, patch features"),
        reports / f"{_slug(path)}_pca.png",
    )
    lines.append(f"picture: {out}")
    return "\n".join(lines)


# --- K-Means codebook ---------------------------------------------------------------------------------


def _is_kmeans(p: Path) -> bool:
    return (p.is_dir() and (p / "centroids.npy").is_file()) or (p.is_file() and p.name == "centroids.npy")


@register("k-means codebook", _is_kmeans)
def show_kmeans(path: Path, reports: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.tokenizer import load_centroids

    directory = path if path.is_dir() else path.parent
    centroids, meta = load_centroids(directory)
    k, d = centroids.shape
    norms = np.linalg.norm(centroids, axis=1)
    lines = [
        f"centroids: {centroids.dtype} [K={k}, D={d}]; norm min/median/max "
        f"{norms.min():.3g}/{np.median(norms):.3g}/{norms.max():.3g}"
    ]
    if meta:
        lines.append(
            "fit: "
            + ", ".join(
                f"{key}={meta[key]:.4g}" if isinstance(meta[key], float) else f"{key}={meta[key]}"
                for key in ("inertia", "iterations", "device", "n_train", "seconds")
                if key in meta
            )
        )
    usage_path = directory / "usage.npy"
    if usage_path.is_file():
        counts = np.load(usage_path, allow_pickle=False)
        p = counts[counts > 0] / counts.sum()
        entropy = float(-(p * np.log2(p)).sum())
        lines.append(
            f"usage on the training sample: entropy {entropy:.2f} of {np.log2(k):.2f} bits, "
            f"dead clusters {int((counts == 0).sum())}, busiest {int(counts.max())} / "
            f"median {int(np.median(counts))}"
        )
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
        ax[0].bar(np.arange(k), np.sort(counts)[::-1], width=1.0)
        ax[0].set(title="cluster usage (sorted)", xlabel="rank", ylabel="patches", yscale="log")
        ax[1].hist(counts, bins=50)
        ax[1].set(title="histogram of cluster sizes", xlabel="patches per cluster", ylabel="clusters")
        fig.tight_layout()
        out = reports / f"{_slug(directory)}_usage.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
        plt.close(fig)
        lines.append(f"picture: {out}")
    return "\n".join(lines)


# --- token shards -------------------------------------------------------------------------------------


def _is_token_dir(p: Path) -> bool:
    if not p.is_dir():
        return False
    shards = sorted(p.glob("*-[0-9][0-9][0-9][0-9][0-9].tar"))
    return bool(shards) and _is_token_shard(shards[0])


def _is_token_shard(p: Path) -> bool:
    return "digit.npy" in _shard_fields(p) or "vq.npy" in _shard_fields(p)


def _palette(k: int) -> np.ndarray:
    rng = np.random.default_rng(1234)
    return rng.integers(40, 256, (k, 3)).astype(np.uint8)


@register("token shards", lambda p: _is_token_dir(p) or _is_token_shard(p))
def show_tokens(path: Path, reports: Path, n: int = 8, top: int = 8, per_cluster: int = 10) -> str:
    from pipeline.shards import iter_samples, list_shards

    if path.is_dir():
        split = "val" if list(path.glob("val-*.tar")) else "train"
        shards = list_shards(path, split)
        images_dir = _sibling_images(path)
    else:
        split, shards, images_dir = path.name.split("-")[0], [path], _sibling_images(path.parent)
    fields: set[str] = set()
    counts: dict[str, np.ndarray] = {}
    n_images, grids, first = 0, {}, []
    for s in iter_samples(shards):
        n_images += 1
        for f in ("digit.npy", "vq.npy"):
            if f in s:
                fields.add(f)
                t = s[f].astype(np.int64)
                grids[f] = t.shape
                c = np.bincount(t.ravel())
                prev = counts.get(f, np.zeros(0, np.int64))
                size = max(len(prev), len(c))
                counts[f] = np.pad(prev, (0, size - len(prev))) + np.pad(c, (0, size - len(c)))
        if len(first) < 64:
            first.append(s)
    lines = [f"{split}: {n_images} images in {len(shards)} shard(s); fields: {', '.join(sorted(fields))}"]
    meta_path = (path if path.is_dir() else path.parent) / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if meta.get("views", 1) > 1:
        v = meta["view"]
        lines.append(
            f"views: {meta['views']} per image (view 0 = the stored image in digit.npy/vq.npy; views 1.. in "
            f"{meta['digit'].get('views_field')}/{meta['vq'].get('views_field')}: crops of scale {v['scale']}, "
            f"ratio {v['ratio']}, flip {v['flip']}, seed {v['seed']}); the pictures show view 0"
        )
    for f in sorted(fields):
        c = counts[f]
        p = c[c > 0] / c.sum()
        lines.append(
            f"{f}: grid {list(grids[f])}, ids used {int((c > 0).sum())} (max id {len(c) - 1}), "
            f"usage entropy {float(-(p * np.log2(p)).sum()):.2f} bits"
        )
    field = "digit.npy" if "digit.npy" in fields else sorted(fields)[0]
    images = _images_by_key(images_dir, split, [s["__key__"] for s in first])
    k = len(counts[field])
    pal = _palette(k)
    picked = first[:n]
    h, w = grids[field]
    if images:
        size = images[picked[0]["__key__"]].shape[0]
        over = []
        for s in picked:
            img = images[s["__key__"]].astype(np.float32)
            tok = _upscale(pal[s[field].astype(np.int64)], size).astype(np.float32)
            over.append((0.45 * img + 0.55 * tok).astype(np.uint8))
        rows = [[images[s["__key__"]] for s in picked], over]
        labels = ["image", f"{field} map"]
        # Montage: the image patches that fall in the most used clusters.
        ph, pw = size // h, size // w
        busiest = np.argsort(counts[field])[::-1][:top]
        for c in busiest:
            crops = []
            for s in first:
                if s["__key__"] not in images:
                    continue
                for i, j in zip(*np.nonzero(s[field].astype(np.int64) == c), strict=True):
                    crops.append(images[s["__key__"]][i * ph : (i + 1) * ph, j * pw : (j + 1) * pw])
                    if len(crops) >= per_cluster:
                        break
                if len(crops) >= per_cluster:
                    break
            if crops:
                rows.append([_upscale(cr, size // 2) for cr in crops])
                labels.append(f"token {c}")
    else:
        rows = [[_upscale(pal[s[field].astype(np.int64)], 64) for s in picked]]
        labels = [f"{field} map"]
        lines.append("(no image shards found beside the token shards: token maps only)")
    out = save_png(image_grid(rows, labels, title=f"{split}: {field}"), reports / f"{_slug(path)}_tokens.png")
    lines.append(f"picture: {out}")
    return "\n".join(lines)


# --- checkpoints (encoder, VQ, GPT, renderer, judge) ------------------------------------------------------


def _is_checkpoint(p: Path) -> bool:
    return p.is_dir() and (p / "model.safetensors").is_file() and (p / "config.json").is_file()


def _repo_images(path: Path) -> Path | None:
    """data/images of the repo a models/<name> directory belongs to."""
    for cand in (path.parent.parent / "data/images", path.parent / "images", Path.cwd() / "data/images"):
        if _is_image_dir(cand):
            return cand
    return None


@register("checkpoint", _is_checkpoint)
def show_checkpoint(path: Path, reports: Path) -> str:
    from safetensors import safe_open

    from pipeline.io import read_json

    meta = read_json(path / "config.json")
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        n_params = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118 (safe_open is not a dict)
    kind = meta.get("kind", "?")
    lines = [f"kind: {kind}; parameters: {n_params:,} ({n_params / 1e6:.2f}M)"]
    config = meta.get("config") or meta.get("timm_kwargs")
    if isinstance(config, dict):
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in config.items() if not isinstance(v, dict)))
    for key in ("step", "steps", "last_loss", "source"):
        if key in meta:
            lines.append(f"{key}: {meta[key]}")
    curves = Path("reports/curves")  # the training stages' dvclive directories (pipeline/live.py)
    for live in sorted(curves.glob(f"*{path.name.removeprefix('gpt_')}*")) if curves.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            last = read_curves(live)[-1]
            lines.append(
                f"last row of {live}: "
                + ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items())
            )
    if kind == "ssl_vit":
        lines.append(_encoder_picture(path, reports))
    return "\n".join(lines)


def _encoder_picture(path: Path, reports: Path, n: int = 8) -> str:
    import torch

    from pipeline.encoders import build_encoder
    from pipeline.shards import iter_samples, list_shards

    images_dir = _repo_images(path)
    if images_dir is None:
        return "(no data/images found: no feature picture)"
    images = [s["png"] for _, s in zip(range(n), iter_samples(list_shards(images_dir, "val")), strict=False)]
    enc = build_encoder("ssl", weights=path)
    with torch.inference_mode():
        feats = enc.patch_features(np.stack(images)).numpy()
    h, w = enc.grid
    rgb = pca_rgb(feats).reshape(len(images), h, w, 3)
    size = images[0].shape[0]
    grid = image_grid(
        [images, [_upscale(r, size) for r in rgb]],
        ["image", "PCA to RGB"],
        title=f"patch features, block {enc.block_index}",
    )
    return f"picture: {save_png(grid, reports / f'{_slug(path)}_pca.png')}"


# --- generated samples ------------------------------------------------------------------------------------


def _is_samples(p: Path) -> bool:
    return p.is_dir() and any(p.glob("samples-[0-9][0-9][0-9][0-9][0-9].tar"))


@register("samples", _is_samples)
def show_samples(path: Path, reports: Path, per_class: int = 8) -> str:
    from pipeline.io import read_json
    from pipeline.shards import iter_samples

    shards = sorted(path.glob("samples-[0-9][0-9][0-9][0-9][0-9].tar"))
    by_class: dict[int, list[np.ndarray]] = defaultdict(list)
    n = 0
    for s in iter_samples(shards):
        n += 1
        if len(by_class[s["cls"]]) < per_class:
            by_class[s["cls"]].append(s["png"])
    meta = read_json(path / "meta.json") if (path / "meta.json").is_file() else {}
    lines = [f"{n} samples in {len(shards)} shard(s), {len(by_class)} classes"]
    if meta:
        lines.append(
            "settings: " + ", ".join(f"{k}={v}" for k, v in meta.items() if not isinstance(v, dict | list))
        )
    classes = sorted(by_class)
    grid = image_grid(
        [by_class[c] for c in classes], [str(c) for c in classes], title=f"samples: {path.name}"
    )
    lines.append(f"picture: {save_png(grid, reports / f'{_slug(path)}_samples.png')}")
    return "\n".join(lines)
