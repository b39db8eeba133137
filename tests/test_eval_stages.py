"""train_judge → reference → evaluate, end to end on tiny data made by the real upstream stages
(prepare → extract → kmeans → train_vq → tokenize → train_gpt ×2 → train_renderer → sample ×2)."""

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Params, dump_params, with_overrides
from pipeline.evaluation import (
    DigitStabilityTokenizer,
    gpt_probe_features,
    load_images,
    read_subset,
    render_true_tokens,
    subset_indices,
    vq_reconstructions,
    vq_stability_tokenizer,
)
from pipeline.io import read_json
from pipeline.live import read_curves
from pipeline.metrics.fidelity import FidelityError, load_reference
from pipeline.models.gpt import load_gpt
from pipeline.models.judge import evaluate_accuracy, judge_fingerprint, load_judge
from pipeline.models.renderer import load_renderer
from pipeline.pixel_vq import load_pixel_vq, to_model_range, to_uint8
from pipeline.shards import iter_samples, list_shards
from pipeline.tokenizer import DigitTokenizer, encoder_from_params, load_centroids
from stages import (
    evaluate,
    extract,
    kmeans,
    prepare,
    reference,
    sample,
    tokenize,
    train_gpt,
    train_judge,
    train_renderer,
    train_vq,
)

from .conftest import chain_params

TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "ffn_dim": 64}
N_SAMPLES, PER_SHARD, N_VAL, N_TRAIN, CLASSES = 20, 8, 12, 24, 10
SNRS = (30, 10, 1)


def _params(encoder, **kw) -> Params:
    return with_overrides(
        chain_params(encoder, TINY_MODEL, N_SAMPLES, **kw),
        {
            "train_judge.widths": (8, 16),
            "train_judge.train": {"steps": 8, "batch_size": 8, "warmup_steps": 1, "log_every": 2},
            "evaluate.fidelity.kid_subsets": 10,
            "evaluate.fidelity.isc_splits": 2,
            "evaluate.probe.max_iter": 20,
            "evaluate.probe.weight_decays": (1e-3, 1e-1),
            "evaluate.stability.snrs_db": SNRS,
            "evaluate.stability.batch_size": 5,
            "evaluate.upper_bound.batch_size": 5,
        },
    )


@pytest.fixture(scope="module")
def chain(one_thread, encoder_dir, tmp_path_factory):
    """Upstream artifacts (as tests/test_generation_stages.py builds them) + train_judge, reference, evaluate."""
    root = tmp_path_factory.mktemp("eval")
    params = _params(encoder_dir)
    r = {k: str(root / k) for k in ("images", "features", "kmeans", "vq", "tokens", "renderer", "judge")}
    prepare.run(params, out=r["images"])
    extract.run(params, images=r["images"], out=r["features"])
    kmeans.run(params, features=r["features"], out=r["kmeans"])
    train_vq.run(params, images=r["images"], out=r["vq"], curves=None)
    tokenize.run(
        params, features=r["features"], kmeans=r["kmeans"], images=r["images"], vq=r["vq"], out=r["tokens"]
    )
    train_gpt.run(params, "digit", r["tokens"], str(root / "gpt_digit"), None)
    uncond = with_overrides(params, {"train_gpt.model": {**TINY_MODEL, "class_conditional": False}})
    train_gpt.run(uncond, "vq", r["tokens"], str(root / "gpt_vq"), None)
    train_renderer.run(params, r["tokens"], r["renderer"], None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sample, "SAMPLES_PER_SHARD", PER_SHARD)
        for variant in ("digit", "vq"):
            sample.run(
                params,
                variant=variant,
                gpt=str(root / f"gpt_{variant}"),
                renderer=r["renderer"],
                vq=r["vq"],
                tokens=r["tokens"],
                out=str(root / f"samples_{variant}"),
                grid=None,
            )
    m = {
        "judge": train_judge.run(params, r["images"], r["judge"], str(root / "judge_curves")),
        "reference": reference.run(params, r["images"], r["judge"], str(root / "reference")),
    }
    paths = eval_paths(root)
    m["evaluate"] = evaluate.run(params, **paths)
    return root, params, m, paths


def eval_paths(root: Path, out: str = "eval") -> dict[str, str]:
    return {
        "images": str(root / "images"),
        "tokens": str(root / "tokens"),
        "kmeans": str(root / "kmeans"),
        "vq": str(root / "vq"),
        "gpt_digit": str(root / "gpt_digit"),
        "gpt_vq": str(root / "gpt_vq"),
        "renderer": str(root / "renderer"),
        "samples_digit": str(root / "samples_digit"),
        "samples_vq": str(root / "samples_vq"),
        "judge": str(root / "judge"),
        "reference": str(root / "reference"),
        "out": str(root / out),
    }


def _tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _val_images(root, n=None):
    return np.stack([s["png"] for s in read_subset(list_shards(root / "images", "val"), n, 0)])


# --- train_judge / reference ---------------------------------------------------------------------------


def test_train_judge_promotes_weights_and_reports_val_accuracy(chain):
    root, _, m, _ = chain
    metrics = m["judge"]
    assert not (root / "judge.partial").exists()
    assert sorted(p.name for p in (root / "judge").iterdir()) == ["config.json", "model.safetensors"]
    judge = load_judge(root / "judge")
    assert judge.config.num_classes == CLASSES and judge.config.image_size == 32
    assert judge.config.widths == (8, 16)
    val = list(iter_samples(list_shards(root / "images", "val")))
    x = torch.from_numpy(np.stack([s["png"] for s in val])).permute(0, 3, 1, 2)
    acc = evaluate_accuracy(judge, x, torch.tensor([s["cls"] for s in val]))
    assert metrics["val_top1"] == pytest.approx(acc) and metrics["val_images"] == N_VAL
    assert read_json(root / "judge/config.json")["val_top1"] == pytest.approx(acc)
    assert metrics["train_images"] == N_TRAIN and metrics["steps"] == 8 and metrics["resumed_from_step"] == 0
    assert 0.0 <= metrics["train_top1"] <= 1.0 and math.isfinite(metrics["final_loss"])
    rows = read_curves(root / "judge_curves")
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6, 7] and "acc" in rows[0]  # and the last step


def test_reference_measures_every_val_image_with_the_judge(chain):
    root, _, m, _ = chain
    tensors, meta = load_reference(root / "reference")
    assert meta["extractor"] == "judge" and meta["n"] == N_VAL and meta["image_size"] == [32, 32]
    assert meta["judge_sha256"] == judge_fingerprint(root / "judge")
    assert tensors["mu"].shape == (2 * 16,) and tensors["features.feat"].shape == (N_VAL, 32)
    assert m["reference"]["n"] == N_VAL and m["reference"]["extractor"] == "judge"
    assert m["reference"]["feature_dim"] == 32 and m["reference"]["image_size"] == 32


def test_reference_with_inception_needs_a_local_weights_file(chain, tmp_path):
    root, params, _, _ = chain
    weights = tmp_path / "pt_inception.pth"
    p = with_overrides(
        params,
        {
            "evaluate.fidelity.extractor": "inception-v3-compat",
            "evaluate.fidelity.inception_weights": str(weights),
        },
    )
    with pytest.raises(FidelityError, match=f"inception-v3-compat: weights file {weights} does not exist"):
        reference.run(p, str(root / "images"), str(root / "judge"), str(tmp_path / "ref"))
    assert not (tmp_path / "ref").exists()


# --- evaluate ------------------------------------------------------------------------------------------


FIDELITY = ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall", "n")
SETS = ("digit", "vq", "real", "upper_digit_renderer", "upper_vq_recon", "upper_real")


def expected_keys() -> list[str]:
    keys = [f"{s}_{k}" for s in SETS for k in FIDELITY]
    for v in ("digit", "vq"):
        keys += [f"{v}_probe_{k}" for k in ("top1", "best_layer", "holdout_top1", "weight_decay", "layers")]
        keys += [f"{v}_change_rate_{snr}db" for snr in SNRS] + [f"{v}_cosine_{snr}db" for snr in SNRS]
        keys += [f"{v}_mean_change_rate", f"{v}_mean_cosine", f"{v}_probe_top1_last_layer"]
        keys += [f"{v}_gpt_{k}" for k in ("temperature", "top_k", "top_p", "cfg_scale")]
        keys += [f"{v}_sample_seed", f"{v}_sample_batch_invariant"]
    keys += [f"digit_renderer_{k}" for k in ("temperature", "top_k", "top_p")]
    keys += [f"upper_renderer_{k}" for k in ("temperature", "top_k", "top_p")]
    keys += ["reference_n", "image_size", "judge_val_top1", "upper_bound_images", "upper_bound_seed"]
    keys += ["probe_train_images", "probe_val_images", "probe_seed", "probe_chance_top1"]
    keys += ["stability_images", "stability_seed", "stability_clean_agreement", "fidelity_seed"]
    keys += ["digit_fid_over_vq_fid", "digit_is_over_vq_is", "digit_fid_over_real_fid", "probe_top1_delta"]
    keys += ["upper_renderer_fid_over_vq_recon_fid", "upper_fid_over_real_fid", "change_rate_ratio"]
    keys += ["seconds", "fidelity_seconds", "upper_bound_seconds", "probe_seconds", "stability_seconds"]
    return keys


def test_evaluate_reports_every_metric_finite(chain):
    _, _, m, _ = chain
    metrics = m["evaluate"]
    missing = [k for k in expected_keys() if k not in metrics]
    assert not missing, missing
    for key, value in metrics.items():
        assert isinstance(value, (int, float, str)), key
        if not isinstance(value, str):
            assert math.isfinite(value), key
    assert metrics["extractor"] == "judge" and metrics["reference_n"] == N_VAL
    for s in ("digit", "vq", "real"):
        assert metrics[f"{s}_n"] == N_SAMPLES and metrics[f"{s}_fid"] >= 0
        assert 1.0 <= metrics[f"{s}_is"] <= CLASSES and 0 <= metrics[f"{s}_precision"] <= 1
    # upper bounds: 200 by default, capped by the 12 val images; their floor at the same N
    assert metrics["upper_bound_images"] == metrics["upper_digit_renderer_n"] == N_VAL
    assert metrics["upper_vq_recon_n"] == metrics["upper_real_n"] == N_VAL
    assert metrics["judge_val_top1"] == m["judge"]["val_top1"]
    # knobs come from the samples' meta.json and params.sample.renderer
    assert metrics["digit_gpt_top_k"] == 100 and metrics["digit_renderer_top_p"] == 0.5
    assert metrics["upper_renderer_top_p"] == 0.5 and metrics["vq_gpt_cfg_scale"] == 1.0
    assert metrics["digit_fid_over_vq_fid"] == pytest.approx(metrics["digit_fid"] / metrics["vq_fid"])
    assert metrics["probe_top1_delta"] == pytest.approx(
        metrics["digit_probe_top1"] - metrics["vq_probe_top1"]
    )


def test_class_top1_scores_images_against_the_class_they_were_drawn_for(chain):
    _, _, m, paths = chain
    metrics = m["evaluate"]
    assert "vq_class_top1" not in metrics  # this chain's VQ GPT is unconditional: nothing was asked for
    for key in ("digit_class_top1", "upper_digit_renderer_class_top1", "upper_vq_recon_class_top1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    images, labels = load_images(paths["images"], "val")
    judge = load_judge(paths["judge"])
    right = evaluate.class_top1("x", images, labels, judge)["x_class_top1"]
    assert right == pytest.approx(m["judge"]["val_top1"])  # real val images: the judge's own val accuracy
    wrong = evaluate.class_top1("x", images, (labels + 1) % CLASSES, judge)["x_class_top1"]
    assert wrong <= 1.0 - right
    unconditional = np.full_like(labels, sample.NO_CLASS)
    assert evaluate.class_top1("x", images, unconditional, judge) == {}


def test_probe_tsv_matches_the_metrics(chain):
    root, _, m, _ = chain
    rows = _tsv(root / "eval" / evaluate.PROBE_TSV)
    assert list(rows[0]) == ["layer", "digit", "vq"] and [int(r["layer"]) for r in rows] == [1, 2]
    metrics = m["evaluate"]
    for v in ("digit", "vq"):
        best = metrics[f"{v}_probe_best_layer"]
        assert best in (1, 2) and metrics[f"{v}_probe_layers"] == 2
        assert float(rows[best - 1][v]) == pytest.approx(metrics[f"{v}_probe_top1"], abs=1e-6)
        assert float(rows[-1][v]) == pytest.approx(metrics[f"{v}_probe_top1_last_layer"], abs=1e-6)
        assert all(0.0 <= float(r[v]) <= 1.0 for r in rows)
    assert metrics["probe_train_images"] == N_TRAIN and metrics["probe_val_images"] == N_VAL


def test_stability_tsv_rows_and_trend(chain):
    root, _, m, _ = chain
    rows = _tsv(root / "eval" / evaluate.STABILITY_TSV)
    assert list(rows[0]) == ["snr_db", "digit_change_rate", "vq_change_rate", "digit_cosine", "vq_cosine"]
    assert [float(r["snr_db"]) for r in rows] == list(SNRS)
    metrics = m["evaluate"]
    for r, snr in zip(rows, SNRS, strict=True):
        for v in ("digit", "vq"):
            assert float(r[f"{v}_change_rate"]) == pytest.approx(
                metrics[f"{v}_change_rate_{snr}db"], rel=1e-5
            )
            assert float(r[f"{v}_cosine"]) == pytest.approx(metrics[f"{v}_cosine_{snr}db"], rel=1e-5)
    for v in ("digit", "vq"):
        # more noise, more changed tokens and less similar latents (same noise pattern scaled: monotone)
        assert metrics[f"{v}_change_rate_1db"] >= metrics[f"{v}_change_rate_30db"]
        assert metrics[f"{v}_change_rate_1db"] > 0
        assert metrics[f"{v}_cosine_1db"] < metrics[f"{v}_cosine_30db"] <= 1.0
    # the adapter tokenizes clean images as the tokenize stage did (up to float16 feature storage)
    assert metrics["stability_clean_agreement"] >= 0.9


def test_upper_bound_grid_and_reproducible_rerun_via_cli(chain, tmp_path, monkeypatch):
    root, params, m, paths = chain
    assert (root / "eval" / evaluate.UPPER_GRID).is_file()
    assert not (root / "eval.tmp").exists()
    dump_params(params, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    argv = ["--params", "params.yaml"]
    for key, value in eval_paths(root, str(tmp_path / "eval2")).items():
        argv += [f"--{key.replace('_', '-')}", value]
    assert evaluate.main(argv) == 0
    again = read_json(tmp_path / "metrics/eval.json")
    first = m["evaluate"]
    timing = {k for k in first if k.endswith("seconds")}
    assert {k: v for k, v in again.items() if k not in timing} == {
        k: v for k, v in first.items() if k not in timing
    }
    for name in (evaluate.PROBE_TSV, evaluate.STABILITY_TSV, evaluate.UPPER_GRID):
        assert (tmp_path / "eval2" / name).read_bytes() == (root / "eval" / name).read_bytes(), name


def test_evaluate_names_the_missing_stage(chain, tmp_path):
    root, params, _, paths = chain
    with pytest.raises(FileNotFoundError, match=r"samples_vq: vq samples not found .*stages.sample"):
        evaluate.run(
            params, **{**paths, "samples_vq": str(tmp_path / "samples_vq"), "out": str(tmp_path / "e")}
        )
    with pytest.raises(FileNotFoundError, match=r"reference statistics not found .*stages.reference"):
        evaluate.run(params, **{**paths, "reference": str(tmp_path / "ref"), "out": str(tmp_path / "e")})
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.tmp").exists()


# --- library pieces (pipeline/evaluation.py) ------------------------------------------------------------


def test_subsets_are_seeded_sorted_and_indexed(chain):
    root, _, _, _ = chain
    a, b = subset_indices(100, 10, 0), subset_indices(100, 10, 1)
    assert len(set(a.tolist())) == 10 and list(a) == sorted(a) and not np.array_equal(a, b)
    assert np.array_equal(a, subset_indices(100, 10, 0)) and np.array_equal(
        subset_indices(5, None, 0), range(5)
    )
    assert np.array_equal(subset_indices(5, 50, 0), range(5))
    shards = list_shards(root / "images", "train")  # 3 shards of 10, 10, 4
    everything = list(iter_samples(shards))
    chosen = read_subset(shards, 7, 3)
    assert [s["__index__"] for s in chosen] == subset_indices(N_TRAIN, 7, 3).tolist()
    for s in chosen:
        assert s["__key__"] == everything[s["__index__"]]["__key__"]
        np.testing.assert_array_equal(s["png"], everything[s["__index__"]]["png"])


def test_probe_features_are_label_free_block_means(chain):
    root, _, _, _ = chain
    gpt = load_gpt(root / "gpt_digit")
    assert gpt.config.num_classes == CLASSES  # class-conditional: the label must not leak
    rows = read_subset(list_shards(root / "tokens", "val"), 5, 0)
    ids = torch.from_numpy(np.stack([s["digit.npy"] for s in rows]).astype(np.int64)).view(5, -1)
    feats = gpt_probe_features(gpt, ids, batch_size=2, progress=False)
    hidden = gpt.eval().forward_features(ids, labels=None)
    assert len(feats) == 2 and feats[0].shape == (5, 32)
    for f, h in zip(feats, hidden, strict=True):
        torch.testing.assert_close(f, h.mean(dim=1), rtol=1e-5, atol=1e-6)
    with_labels = gpt.forward_features(ids, labels=torch.arange(5))[-1].mean(dim=1)
    assert not torch.allclose(with_labels, feats[-1])


def test_digit_stability_tokenizer_is_the_pipeline_tokenizer_without_clamping(chain):
    root, params, _, _ = chain
    encoder = encoder_from_params(params.encoder, params.base)
    centroids, _ = load_centroids(root / "kmeans")
    images = _val_images(root, 6)
    ref_tokens, ref_feats = DigitTokenizer(encoder, centroids)(images)
    tokens, feats = DigitStabilityTokenizer(encoder, centroids)(to_model_range(images))
    torch.testing.assert_close(feats, ref_feats.cpu(), rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens.view(6, -1), ref_tokens.view(6, -1).cpu())
    # noisy pixels outside [-1, 1] are taken as they are (Encoder.preprocess would refuse them)
    loud = to_model_range(images) * 3.0
    _, loud_feats = DigitStabilityTokenizer(encoder, centroids)(loud)
    _, clamped_feats = DigitStabilityTokenizer(encoder, centroids)(loud.clamp(-1, 1))
    assert not torch.allclose(loud_feats, clamped_feats)
    vq = load_pixel_vq(root / "vq")
    ids, latents = vq_stability_tokenizer(vq)(to_model_range(images))
    assert ids.shape == (6, 16) and latents.shape[:2] == (6, 16)
    assert torch.equal(ids.view(6, 4, 4), vq.encode(to_model_range(images)))


def test_upper_bound_images_are_per_index_and_batch_free(chain):
    root, params, _, _ = chain
    vq = load_pixel_vq(root / "vq")
    renderer = load_renderer(root / "renderer").eval()
    rows = read_subset(list_shards(root / "tokens", "val"), 5, 0)
    digit = torch.from_numpy(np.stack([s["digit.npy"] for s in rows]).astype(np.int64)).view(5, -1)
    indices = [s["__index__"] for s in rows]
    kw = dict(top_p=0.8, progress=False)
    full = render_true_tokens(renderer, vq, digit, (4, 4), indices, 7, batch_size=5, **kw)
    assert full.shape == (5, 32, 32, 3) and full.dtype == np.uint8
    np.testing.assert_array_equal(
        full, render_true_tokens(renderer, vq, digit, (4, 4), indices, 7, batch_size=2, **kw)
    )
    # image j depends on its own index only, not on the other images chosen
    alone = render_true_tokens(renderer, vq, digit[3:4], (4, 4), indices[3:4], 7, batch_size=1, **kw)
    np.testing.assert_array_equal(alone[0], full[3])
    images = _val_images(root, 5)
    recon = vq_reconstructions(vq, images, batch_size=2, progress=False)
    np.testing.assert_array_equal(recon[1], to_uint8(vq.reconstruct(to_model_range(images[1:2])))[0])
