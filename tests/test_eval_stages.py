"""train_judge → reference → the evaluation stages (fidelity, fidelity_real, class_match, probe, stability,
upper_bound, compare), end to end on tiny data made by the real upstream stages (prepare → extract → kmeans →
train_vq → tokenize → train_gpt ×2 → train_renderer → sample ×2)."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Params, dump_params, with_overrides
from pipeline.evaluation import (
    load_images,
    read_subset,
    render_true_tokens,
    subset_indices,
    vq_reconstructions,
    write_probe_features,
)
from pipeline.io import read_json
from pipeline.live import read_curves
from pipeline.metrics.fidelity import FidelityError, load_reference
from pipeline.models.gpt import load_gpt
from pipeline.models.judge import evaluate_accuracy, judge_fingerprint, load_judge
from pipeline.models.renderer import load_renderer
from pipeline.pixel_vq import load_pixel_vq, to_model_range, to_uint8
from pipeline.shards import ShardImages, iter_samples, list_shards
from pipeline.tokenizer import (
    DigitStabilityTokenizer,
    DigitTokenizer,
    encoder_from_params,
    load_centroids,
    vq_stability_tokenizer,
)
from stages import (
    class_match,
    compare,
    extract,
    fidelity,
    fidelity_real,
    kmeans,
    prepare,
    probe,
    reference,
    sample,
    stability,
    tokenize,
    train_gpt,
    train_judge,
    train_renderer,
    train_vq,
    upper_bound,
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
            "sample.shard_size": PER_SHARD,
        },
    )


def eval_paths(root: Path) -> dict[str, dict[str, str]]:
    """Every evaluation stage's paths into the chain's directory."""
    r = {k: str(root / k) for k in ("images", "tokens", "kmeans", "vq", "renderer", "judge", "reference")}
    out = {
        "fidelity_real": {k: r[k] for k in ("images", "judge", "reference")},
        "probe": {"tokens": r["tokens"]},
        "stability": {k: r[k] for k in ("images", "tokens", "kmeans", "vq")}
        | {"live": str(root / "live_stability")},
        "upper_bound": {k: r[k] for k in ("images", "tokens", "vq", "renderer", "judge", "reference")}
        | {"out": str(root / "upper"), "live": str(root / "live_upper")},
    }
    for v in ("digit", "vq"):
        out[f"fidelity_{v}"] = {"variant": v, "samples": str(root / f"samples_{v}"), "judge": r["judge"]}
        out[f"fidelity_{v}"]["reference"] = r["reference"]
        out[f"class_match_{v}"] = {"variant": v, "samples": str(root / f"samples_{v}"), "judge": r["judge"]}
        out[f"probe_{v}"] = {
            "variant": v,
            "tokens": r["tokens"],
            "gpt": str(root / f"gpt_{v}"),
            "live": str(root / f"live_probe_{v}"),
        }
    return out


STAGES = {
    "fidelity_digit": fidelity,
    "fidelity_vq": fidelity,
    "fidelity_real": fidelity_real,
    "class_match_digit": class_match,
    "class_match_vq": class_match,
    "probe_digit": probe,
    "probe_vq": probe,
    "stability": stability,
    "upper_bound": upper_bound,
}


@pytest.fixture(scope="module")
def chain(one_thread, encoder_dir, tmp_path_factory):
    """Upstream artifacts (as tests/test_generation_stages.py builds them) + train_judge, reference and every
    evaluation stage; the stages' metrics are also written to <root>/metrics/<name>.json for compare."""
    root = tmp_path_factory.mktemp("eval")
    params = _params(encoder_dir)
    r = {k: str(root / k) for k in ("images", "features", "kmeans", "vq", "tokens", "renderer", "judge")}
    prepare.run(params, out=r["images"])
    extract.run(params, images=r["images"], out=r["features"])
    kmeans.run(params, features=r["features"], out=r["kmeans"])
    train_vq.run(params, images=r["images"], out=r["vq"], curves=None)
    tokenize.run(params, kmeans=r["kmeans"], images=r["images"], vq=r["vq"], out=r["tokens"])
    train_gpt.run(params, "digit", r["tokens"], str(root / "gpt_digit"), None)
    uncond = with_overrides(params, {"train_gpt.model": {**TINY_MODEL, "class_conditional": False}})
    train_gpt.run(uncond, "vq", r["tokens"], str(root / "gpt_vq"), None)
    train_renderer.run(params, r["tokens"], r["renderer"], None)
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
    (root / "metrics").mkdir()
    for name, stage in STAGES.items():
        m[name] = stage.run(params, **paths[name])
        (root / "metrics" / f"{name}.json").write_text(json.dumps(m[name]))
    m["compare"] = compare.run(params, metrics_dir=str(root / "metrics"))
    return root, params, m, paths


def _tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _plot(live, name):
    """The rows of a final plot logged through dvclive (pipeline/live.py:log_results)."""
    return json.loads((Path(live) / "plots" / "custom" / f"{name}.json").read_text())


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


# --- the evaluation stages ---------------------------------------------------------------------------


FIDELITY = ("fid", "is", "is_std", "kid", "kid_std", "precision", "recall", "n")


def _finite(metrics: dict) -> None:
    for key, value in metrics.items():
        assert isinstance(value, (int, float, str)), key
        if not isinstance(value, str):
            assert math.isfinite(value), key


def test_fidelity_of_each_sample_set_and_the_real_floor(chain):
    _, _, m, _ = chain
    for s in ("digit", "vq", "real"):
        metrics = m[f"fidelity_{s}"]
        _finite(metrics)
        assert all(f"{s}_{k}" in metrics for k in FIDELITY), metrics
        assert metrics[f"{s}_n"] == N_SAMPLES and metrics[f"{s}_fid"] >= 0
        assert 1.0 <= metrics[f"{s}_is"] <= CLASSES and 0 <= metrics[f"{s}_precision"] <= 1
    # knobs come from the samples' meta.json (what was used)
    assert (
        m["fidelity_digit"]["digit_gpt_top_k"] == 100 and m["fidelity_digit"]["digit_renderer_top_p"] == 0.5
    )
    assert m["fidelity_vq"]["vq_gpt_cfg_scale"] == 1.0 and m["fidelity_digit"]["extractor"] == "judge"


def test_streamed_fidelity_equals_fidelity_of_the_images_in_ram(chain):
    root, params, m, paths = chain
    from pipeline.metrics.fidelity import compute_fidelity

    images = np.stack([s["png"] for s in iter_samples(list_shards(root / "samples_digit", "samples"))])
    f = params.evaluate.fidelity
    in_ram = compute_fidelity(
        images,
        reference=paths["fidelity_digit"]["reference"],
        judge_dir=paths["fidelity_digit"]["judge"],
        kid_subsets=f.kid_subsets,
        isc_splits=f.isc_splits,
        seed=f.seed,
        batch_size=f.batch_size,
        device="cpu",
        verbose=False,
    )
    assert m["fidelity_digit"]["digit_fid"] == pytest.approx(in_ram["fid"], rel=1e-6)
    assert m["fidelity_digit"]["digit_kid"] == pytest.approx(in_ram["kid_mean"], rel=1e-6, abs=1e-9)


def test_class_match_scores_samples_against_the_class_they_were_drawn_for(chain):
    root, _, m, paths = chain
    assert m["class_match_vq"] == {
        "vq_class_conditional": 0,
        "vq_class_n": N_SAMPLES,
        "seconds": pytest.approx(m["class_match_vq"]["seconds"]),
    }
    digit = m["class_match_digit"]
    assert digit["digit_class_conditional"] == 1 and 0.0 <= digit["digit_class_top1"] <= 1.0
    judge = load_judge(paths["class_match_digit"]["judge"])
    drawn = ShardImages(list_shards(root / "samples_digit", "samples"))
    assert drawn.labels.tolist() == [i % CLASSES for i in range(N_SAMPLES)]
    assert digit["digit_class_top1"] == pytest.approx(evaluate_accuracy(judge, drawn, drawn.labels))
    images, labels = load_images(root / "images", "val")
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    right = evaluate_accuracy(judge, x, labels)
    assert right == pytest.approx(m["judge"]["val_top1"])  # real val images: the judge's own val accuracy
    assert evaluate_accuracy(judge, x, (labels + 1) % CLASSES) <= 1.0 - right


def test_probe_tsv_matches_the_metrics(chain):
    root, _, m, _ = chain
    for v in ("digit", "vq"):
        metrics = m[f"probe_{v}"]
        _finite(metrics)
        rows = _plot(root / f"live_probe_{v}", "probe")
        assert sorted(rows[0]) == ["layer", "top1"] and [int(r["layer"]) for r in rows] == [1, 2]
        live = json.loads((root / f"live_probe_{v}" / "metrics.json").read_text())
        assert live[f"{v}_probe_top1"] == metrics[f"{v}_probe_top1"]  # the figures, through dvclive
        best = metrics[f"{v}_probe_best_layer"]
        assert best in (1, 2) and metrics[f"{v}_probe_layers"] == 2
        assert float(rows[best - 1]["top1"]) == pytest.approx(metrics[f"{v}_probe_top1"], abs=1e-6)
        assert float(rows[-1]["top1"]) == pytest.approx(metrics[f"{v}_probe_top1_last_layer"], abs=1e-6)
        assert metrics["probe_train_images"] == N_TRAIN and metrics["probe_val_images"] == N_VAL
    assert not (root / "live_probe_digit.features").exists()  # the streamed features are scratch


def test_stability_tsv_rows_and_trend(chain):
    root, _, m, _ = chain
    rows = _plot(root / "live_stability", "stability")
    assert sorted(rows[0]) == sorted(
        ["snr_db", "digit_change_rate", "vq_change_rate", "digit_cosine", "vq_cosine"]
    )
    assert [float(r["snr_db"]) for r in rows] == list(SNRS)
    metrics = m["stability"]
    _finite(metrics)
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


def test_upper_bound_images_metrics_and_grid(chain):
    root, _, m, _ = chain
    metrics = m["upper_bound"]
    _finite(metrics)
    # 100 by default, capped by the 12 val images; their floor at the same N
    assert metrics["upper_bound_images"] == metrics["upper_digit_renderer_n"] == N_VAL
    assert metrics["upper_vq_recon_n"] == metrics["upper_real_n"] == N_VAL
    assert metrics["upper_renderer_top_p"] == 0.5
    for name in ("digit_renderer", "vq_recon"):
        assert 0.0 <= metrics[f"upper_{name}_class_top1"] <= 1.0
        made = ShardImages(list_shards(root / "upper", name))
        val = {s["__key__"]: s["cls"] for s in iter_samples(list_shards(root / "images", "val"))}
        assert len(made) == N_VAL and made.labels.tolist() == [val[k] for k in made.keys]
    vq = load_pixel_vq(root / "vq")
    recon = ShardImages(list_shards(root / "upper", "vq_recon"))
    first = next(
        s for s in iter_samples(list_shards(root / "images", "val")) if s["__key__"] == recon.keys[0]
    )
    expected = to_uint8(vq.reconstruct(to_model_range(first["png"][None])))[0]
    # batched decode (the default) may differ from a one-image decode in the last bit of a pixel
    got = recon[0].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 1
    assert (root / "live_upper/plots/images/upper_bounds.png").is_file() and not (root / "upper.tmp").exists()


def test_compare_ratios_follow_from_the_stage_metrics(chain):
    _, _, m, _ = chain
    c = m["compare"]
    _finite(c)
    digit, vq = m["fidelity_digit"], m["fidelity_vq"]
    assert c["digit_fid_over_vq_fid"] == pytest.approx(digit["digit_fid"] / vq["vq_fid"])
    assert c["probe_top1_delta"] == pytest.approx(
        m["probe_digit"]["digit_probe_top1"] - m["probe_vq"]["vq_probe_top1"]
    )
    assert c["change_rate_ratio"] == pytest.approx(
        m["stability"]["digit_mean_change_rate"] / m["stability"]["vq_mean_change_rate"]
    )


def test_stage_reruns_via_cli_are_reproducible(chain, tmp_path, monkeypatch):
    root, params, m, paths = chain
    dump_params(params, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for name in ("upper_bound", "probe_digit"):
        argv = ["--params", "params.yaml", "--metrics", str(tmp_path / f"{name}.json")]
        for key, value in paths[name].items():
            if key in ("out", "live"):
                value = str(tmp_path / Path(value).name)
            argv += [f"--{key.replace('_', '-')}", value]
        assert STAGES[name].main(argv) == 0
        again = read_json(tmp_path / f"{name}.json")
        assert {k: v for k, v in again.items() if k != "seconds"} == {
            k: v for k, v in m[name].items() if k != "seconds"
        }
    plot = "plots/custom/probe.json"
    assert (tmp_path / "live_probe_digit" / plot).read_bytes() == (
        root / "live_probe_digit" / plot
    ).read_bytes()
    for shard in list_shards(root / "upper", "digit_renderer"):
        assert (tmp_path / "upper" / shard.name).read_bytes() == shard.read_bytes()


def test_stages_name_what_is_missing(chain, tmp_path):
    root, params, _, paths = chain
    with pytest.raises(FileNotFoundError, match=r"samples_vq: vq samples not found .*stages.sample"):
        fidelity.run(params, **{**paths["fidelity_vq"], "samples": str(tmp_path / "samples_vq")})
    with pytest.raises(FileNotFoundError, match=r"reference statistics not found .*stages.reference"):
        fidelity.run(params, **{**paths["fidelity_digit"], "reference": str(tmp_path / "ref")})
    with pytest.raises(FileNotFoundError, match=r"renderer not found .*stages.train_renderer"):
        upper_bound.run(
            params, **{**paths["upper_bound"], "renderer": str(tmp_path / "r"), "out": str(tmp_path / "u")}
        )
    with pytest.raises(
        FileNotFoundError, match=r"metrics of fidelity_digit, .*probe_vq, .*stages.probe --variant vq"
    ):
        compare.run(params, metrics_dir=str(tmp_path))
    assert not (tmp_path / "u").exists() and not (tmp_path / "u.tmp").exists()


def test_without_a_judge_nothing_is_trained_and_class_match_says_so(chain, tmp_path):
    root, params, _, paths = chain
    inception = with_overrides(params, {"evaluate.fidelity.extractor": "inception-v3-compat"})
    out = tmp_path / "judge"
    metrics = train_judge.run(inception, str(root / "images"), str(out), None)
    assert metrics["trained"] == 0 and sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert "inception-v3-compat" in read_json(out / "config.json")["reason"]
    got = class_match.run(params, **{**paths["class_match_digit"], "judge": str(out)})
    assert got["digit_class_conditional"] == 0 and "digit_class_top1" not in got


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


def test_probe_features_are_label_free_block_means(chain, tmp_path):
    root, _, _, _ = chain
    gpt = load_gpt(root / "gpt_digit")
    assert gpt.config.num_classes == CLASSES  # class-conditional: the label must not leak
    rows = read_subset(list_shards(root / "tokens", "val"), 5, 0)
    ids = torch.from_numpy(np.stack([s["digit.npy"] for s in rows]).astype(np.int64)).view(5, -1)
    files = write_probe_features(gpt, [ids[:2], ids[2:]], tmp_path, "val", progress=False)
    feats = [torch.cat([c for _, c in f.chunks(100)]) for f in files]
    hidden = gpt.eval().forward_features(ids, labels=None)
    assert len(feats) == 2 and feats[0].shape == (5, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["val-layer01.f32", "val-layer02.f32"]
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
    kw = dict(top_p=0.8, progress=False, batch_invariant=True)
    full = render_true_tokens(renderer, vq, digit, (4, 4), indices, 7, batch_size=5, **kw)
    assert full.shape == (5, 32, 32, 3) and full.dtype == np.uint8
    np.testing.assert_array_equal(
        full, render_true_tokens(renderer, vq, digit, (4, 4), indices, 7, batch_size=2, **kw)
    )
    # image j depends on its own index only, not on the other images chosen
    alone = render_true_tokens(renderer, vq, digit[3:4], (4, 4), indices[3:4], 7, batch_size=1, **kw)
    np.testing.assert_array_equal(alone[0], full[3])
    images = _val_images(root, 5)
    recon = vq_reconstructions(vq, images, batch_size=2, batch_invariant=True, progress=False)
    np.testing.assert_array_equal(recon[1], to_uint8(vq.reconstruct(to_model_range(images[1:2])))[0])
