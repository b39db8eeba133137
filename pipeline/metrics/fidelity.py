"""FID / IS / KID / precision-recall through torch-fidelity, with our judge or torch-fidelity's Inception.

Two feature extractors:
  "judge"               our CNN classifier (pipeline/models/judge.py), registered into torch-fidelity as
                        "digit-judge"; its checkpoint directory travels as torch-fidelity's own
                        `feature_extractor_weights_path` kwarg (torch-fidelity builds the extractor itself).
                        Features: "feat" (penultimate; FID/KID/PR) and "logits" (IS).
  "inception-v3-compat" torch-fidelity's Inception (the standard numbers). Its weights cannot be downloaded
                        here: pass a local copy of torch-fidelity's .pth as `inception_weights`.

Reference statistics. The real val set is measured once by `reference_stats` into a directory
(reference.safetensors: mu, sigma and the features KID/PR need; reference.json: extractor, N, image size,
weights fingerprint). `compute_fidelity(fake, reference=dir)` then extracts only the fake features with
torch-fidelity's own extraction code and applies torch-fidelity's own metric functions
(fid_features_to_statistics / fid_statistics_to_metric, isc_features_to_metric, kid_features_to_metric)
and precision/recall in blocks (pipeline/metrics/prc.py: torch-fidelity's definition in memory that does not
grow with N) — the same numbers as `calculate_metrics` on both inputs (tested). We do not use
torch-fidelity's file cache: it pickles to disk, keys on a name rather than the weights, and lives outside DVC.

Images are uint8: arrays [N, H, W, 3] or Datasets whose items are uint8 tensors [3, H, W].
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from safetensors.numpy import load_file as load_numpy_file
from safetensors.numpy import save_file as save_numpy_file
from torch.utils.data import DataLoader, Dataset
from torch_fidelity import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor
from tqdm import tqdm

from pipeline.metrics.prc import precision_recall
from pipeline.models.judge import Judge, judge_fingerprint, load_judge, to_judge_input

JUDGE_EXTRACTOR = "digit-judge"  # the name registered in torch-fidelity
EXTRACTORS = {"judge": JUDGE_EXTRACTOR, "inception-v3-compat": "inception-v3-compat"}
METRIC_KEYS = ("fid", "isc_mean", "isc_std", "kid_mean", "kid_std", "precision", "recall", "f_score")
REFERENCE_TENSORS = "reference.safetensors"
REFERENCE_META = "reference.json"

# torch-fidelity's result keys -> ours
_KEY_MAP = {
    torch_fidelity.KEY_METRIC_FID: "fid",
    torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
    torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
    torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
    torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
    torch_fidelity.KEY_METRIC_PRECISION: "precision",
    torch_fidelity.KEY_METRIC_RECALL: "recall",
    torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
}


class FidelityError(ValueError):
    pass


class JudgeFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity view of the judge: uint8 [B, 3, H, W] in, ("feat", "logits") out (as requested)."""

    def __init__(
        self,
        name: str,
        features_list: list[str],
        feature_extractor_weights_path: str | None = None,
        **kwargs: Any,
    ):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise FidelityError(
                f"feature extractor {name!r} needs feature_extractor_weights_path = a judge checkpoint directory"
            )
        self.judge: Judge = load_judge(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("feat", "logits")

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "feat", "kid": "feat", "prc": "feat"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feat = self.judge.features(to_judge_input(x, self.judge.config.image_size))
        out = {"feat": feat}
        if "logits" in self.features_list:
            out["logits"] = self.judge.head(feat)
        return tuple(out[name].float() for name in self.features_list)


def register_judge_extractor() -> None:
    """Register the judge with torch-fidelity (idempotent; done on import)."""
    if JUDGE_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(JUDGE_EXTRACTOR, JudgeFeatureExtractor)


register_judge_extractor()


class UInt8Images(Dataset):
    """uint8 images [N, H, W, 3] (numpy or torch) as a Dataset of uint8 [3, H, W] tensors (torch-fidelity's input)."""

    def __init__(self, images: np.ndarray | torch.Tensor):
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise FidelityError(
                f"expected uint8 images [N, H, W, 3], got {images.dtype} {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].permute(2, 0, 1).contiguous()


def as_image_dataset(images: np.ndarray | torch.Tensor | Dataset, name: str = "images") -> Dataset:
    """Accept uint8 [N, H, W, 3] arrays or a Dataset of uint8 [3, H, W] tensors; check the first item."""
    ds = images if isinstance(images, Dataset) else UInt8Images(images)
    if len(ds) == 0:
        raise FidelityError(f"{name}: no images")
    first = ds[0]
    if not torch.is_tensor(first) or first.dtype != torch.uint8 or first.dim() != 3 or first.shape[0] != 3:
        what = f"{first.dtype} {tuple(first.shape)}" if torch.is_tensor(first) else type(first).__name__
        raise FidelityError(f"{name}: items must be uint8 tensors [3, H, W], got {what}")
    return ds


def _image_size(ds: Dataset) -> list[int]:
    return [int(s) for s in ds[0].shape[1:]]


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _inception_weights(path: str | Path | None) -> str:
    """Resolve the Inception weights to a local file torch-fidelity can load, or fail with what to do."""
    if path is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]
        if cached.is_file():
            path = cached
        else:
            try:
                # torch-fidelity's own download (works where GitHub is reachable), into the torch hub cache.
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=False)
            except Exception as e:  # urllib raises several unrelated types when offline
                raise FidelityError(
                    f"inception-v3-compat: no local weights and the download of {URL_INCEPTION_V3} failed "
                    f"({type(e).__name__}: {e}). Fetch that file on a machine with network access and pass "
                    f"its path as inception_weights (or place it at {cached})."
                ) from e
            path = cached
    path = Path(path)
    if not path.is_file():
        raise FidelityError(f"inception-v3-compat: weights file {path} does not exist")
    # torch-fidelity 0.4.0 loads this file with torch.load(weights_only=False); refuse anything but plain
    # tensors first, so no arbitrary pickle from disk is ever executed.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FidelityError(f"inception-v3-compat: {path} is not a tensors-only state dict ({e})") from e
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise FidelityError(f"inception-v3-compat: {path} must hold a state dict of tensors")
    return str(path)


def _extractor_setup(
    extractor: str, judge_dir: str | Path | None, inception_weights: str | Path | None
) -> tuple[str, str, dict[str, str]]:
    """-> (torch-fidelity extractor name, weights path, identity for reference metadata)."""
    if extractor not in EXTRACTORS:
        raise FidelityError(f"extractor must be one of {sorted(EXTRACTORS)}, got {extractor!r}")
    if extractor == "judge":
        if judge_dir is None:
            raise FidelityError("extractor 'judge' needs judge_dir (a judge checkpoint directory)")
        return JUDGE_EXTRACTOR, str(judge_dir), {"judge_sha256": judge_fingerprint(judge_dir)}
    weights = _inception_weights(inception_weights)
    return EXTRACTORS[extractor], weights, {"inception_sha256": _sha256(weights)}


def _layers(fe_name: str) -> dict[str, str]:
    cls = FEATURE_EXTRACTORS_REGISTRY[fe_name]
    return {m: cls.get_default_feature_layer_for_metric(m) for m in ("isc", "fid", "kid", "prc")}


def _tf_kwargs(fe_name: str, weights: str, cuda: bool, batch_size: int, verbose: bool, **metric: Any) -> dict:
    """The torch-fidelity kwargs shared by both paths (so they compute the same numbers), plus `metric`
    options (rng_seed, kid_subset_size, kid_subsets, isc_splits, prc_neighborhood)."""
    return dict(
        feature_extractor=fe_name,
        feature_extractor_weights_path=weights,
        cuda=cuda,
        batch_size=batch_size,
        samples_shuffle=True,
        # In-process loading: the extractor dominates; workers would fork a process holding all images.
        save_cpu_ram=True,
        cache=False,
        verbose=verbose,
        **metric,
    )


def _resolve_cuda(device: str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    if device not in ("cpu", "cuda"):
        raise FidelityError(f"device must be 'cpu', 'cuda' or None (auto), got {device!r}")
    return device == "cuda"


def _extract(ds: Dataset, fe_name: str, layers: list[str], kw: dict[str, Any]) -> dict[str, torch.Tensor]:
    """torch-fidelity's get_featuresdict_from_dataset (the same extractor calls, batches and outputs), writing
    into features preallocated for the whole set. Its per-batch list of small long-lived tensors, interleaved
    with the extractor's freed temporaries, pinned glibc's heap: peak RSS at 20000 images varied from 0.8 to
    1.27 GB between identical runs (0.76 GB, stable, with a fixed mmap threshold)."""
    feat_extractor = create_feature_extractor(fe_name, layers, **kw)
    loader = DataLoader(ds, batch_size=min(kw["batch_size"], len(ds)), num_workers=0, pin_memory=kw["cuda"])
    out: dict[str, torch.Tensor] = {}
    start = 0
    with (
        torch.no_grad(),
        tqdm(disable=not kw["verbose"], leave=False, unit="img", total=len(ds), desc="features") as bar,
    ):
        for batch in loader:
            if kw["cuda"]:
                batch = batch.cuda(non_blocking=True)
            feats = feat_extractor.convert_features_tuple_to_dict(feat_extractor(batch))
            for name, f in feats.items():
                if name not in out:
                    out[name] = torch.empty((len(ds), *f.shape[1:]), dtype=f.dtype)
                out[name][start : start + len(f)] = f.cpu()
            start += len(batch)
            bar.update(len(batch))
    return out


def reference_stats(
    real: np.ndarray | torch.Tensor | Dataset,
    out_dir: str | Path,
    extractor: str = "judge",
    judge_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 64,
    device: str | None = None,
    verbose: bool = True,
) -> Path:
    """Measure the real images once: write out_dir/{reference.safetensors, reference.json} atomically.

    reference.safetensors: "mu" [F], "sigma" [F, F] (FID statistics of the FID layer) and
    "features.<layer>" [N, F] for the KID and PR layers. reference.json: extractor, layers, n, image_size,
    the weights' sha256 and the torch-fidelity version."""
    ds = as_image_dataset(real, "real")
    fe_name, weights, identity = _extractor_setup(extractor, judge_dir, inception_weights)
    layers = _layers(fe_name)
    kw = _tf_kwargs(fe_name, weights, _resolve_cuda(device), batch_size, verbose)
    needed = sorted({layers["fid"], layers["kid"], layers["prc"]})
    feats = _extract(ds, fe_name, needed, kw)
    stats = fid_features_to_statistics(feats[layers["fid"]])
    tensors = {"mu": stats["mu"], "sigma": stats["sigma"]}
    tensors.update({f"features.{name}": feats[name].numpy() for name in needed})
    meta = {
        "extractor": extractor,
        "feature_extractor": fe_name,
        "layers": layers,
        "n": len(ds),
        "image_size": _image_size(ds),
        "torch_fidelity": torch_fidelity.__version__,
        **identity,
    }

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_numpy_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / REFERENCE_TENSORS))
    (tmp / REFERENCE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_reference(ref_dir: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    ref_dir = Path(ref_dir)
    for name in (REFERENCE_TENSORS, REFERENCE_META):
        if not (ref_dir / name).is_file():
            raise FidelityError(
                f"{ref_dir / name}: missing; a reference directory is written by reference_stats"
            )
    return load_numpy_file(str(ref_dir / REFERENCE_TENSORS)), json.loads(
        (ref_dir / REFERENCE_META).read_text()
    )


def _check_reference(meta: dict[str, Any], ref_dir: Path, extractor: str, identity: dict[str, str]) -> None:
    where = ref_dir / REFERENCE_META
    if meta.get("extractor") != extractor:
        raise FidelityError(f"{where}: computed with extractor {meta.get('extractor')!r}, not {extractor!r}")
    for key, value in identity.items():
        if meta.get(key) != value:
            raise FidelityError(
                f"{where}: {key} is {meta.get(key)}, but the weights given now hash to {value}; "
                f"the reference was computed with other weights — recompute it with reference_stats"
            )


def compute_fidelity(
    fake: np.ndarray | torch.Tensor | Dataset,
    real: np.ndarray | torch.Tensor | Dataset | None = None,
    *,
    reference: str | Path | None = None,
    extractor: str = "judge",
    judge_dir: str | Path | None = None,
    inception_weights: str | Path | None = None,
    kid_subset_size: int | None = None,
    kid_subsets: int = 100,
    isc_splits: int = 10,
    prc_neighborhood: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    device: str | None = None,
    verbose: bool = True,
) -> dict[str, float]:
    """FID, IS, KID, precision/recall (and PR's f_score) of `fake` against `real` or a stored `reference`.

    Give exactly one of `real` (features recomputed with torch_fidelity.calculate_metrics) or `reference`
    (a directory from `reference_stats` made with the same extractor and weights). IS is of `fake` alone.
    kid_subset_size defaults to min(1000, N_fake, N_real). seed drives KID subsets and IS split shuffling.
    Precision = share of fake inside the real manifold; recall = share of real inside the fake manifold.
    device: "cpu", "cuda" or None (CUDA when available). verbose: torch-fidelity's progress bars and log lines.
    """
    if (real is None) == (reference is None):
        raise FidelityError("give exactly one of real (images) or reference (a reference_stats directory)")
    fake_ds = as_image_dataset(fake, "fake")
    fe_name, weights, identity = _extractor_setup(extractor, judge_dir, inception_weights)
    layers = _layers(fe_name)
    n_fake = len(fake_ds)

    if reference is not None:
        ref_dir = Path(reference)
        ref, meta = load_reference(ref_dir)
        _check_reference(meta, ref_dir, extractor, identity)
        n_real, real_size, where = int(meta["n"]), list(meta["image_size"]), str(ref_dir / REFERENCE_META)
    else:
        real_ds = as_image_dataset(real, "real")
        n_real, real_size, where = len(real_ds), _image_size(real_ds), "real"
    if _image_size(fake_ds) != real_size:
        raise FidelityError(
            f"fake images are {_image_size(fake_ds)} but {where} images are {real_size}: resize one set first "
            f"(metrics across resolutions measure the resizing)"
        )
    if kid_subset_size is None:
        kid_subset_size = min(1000, n_fake, n_real)
    if not 2 <= kid_subset_size <= min(n_fake, n_real):
        raise FidelityError(
            f"kid_subset_size={kid_subset_size} must be in [2, min(N_fake={n_fake}, N_real={n_real})]"
        )
    if not 1 <= isc_splits <= n_fake:
        raise FidelityError(f"isc_splits={isc_splits} must be in [1, N_fake={n_fake}]")
    if min(n_fake, n_real) <= prc_neighborhood:
        raise FidelityError(
            f"precision/recall with prc_neighborhood={prc_neighborhood} needs more than "
            f"{prc_neighborhood} images per side, got N_fake={n_fake}, N_real={n_real}"
        )

    kw = _tf_kwargs(
        fe_name,
        weights,
        _resolve_cuda(device),
        batch_size,
        verbose,
        rng_seed=seed,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        isc_splits=isc_splits,
        prc_neighborhood=prc_neighborhood,
    )
    if reference is None:
        raw = torch_fidelity.calculate_metrics(
            input1=fake_ds, input2=real_ds, isc=True, fid=True, kid=True, prc=True, **kw
        )
        return {ours: float(raw[theirs]) for theirs, ours in _KEY_MAP.items()}

    fake_feats = _extract(fake_ds, fe_name, sorted(set(layers.values())), kw)
    out: dict[str, Any] = {}
    out.update(isc_features_to_metric(fake_feats[layers["isc"]], isc_splits, kw["samples_shuffle"], seed))
    fake_stats = fid_features_to_statistics(fake_feats[layers["fid"]])
    out.update(fid_statistics_to_metric(fake_stats, {"mu": ref["mu"], "sigma": ref["sigma"]}, verbose))
    real_kid = torch.from_numpy(ref[f"features.{layers['kid']}"])
    out.update(kid_features_to_metric(fake_feats[layers["kid"]], real_kid, **kw))
    real_prc = torch.from_numpy(ref[f"features.{layers['prc']}"])
    out.update(precision_recall(fake_feats[layers["prc"]], real_prc, prc_neighborhood))
    return {ours: float(out[theirs]) for theirs, ours in _KEY_MAP.items()}
