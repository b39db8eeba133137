"""prepare → extract → kmeans → tokenize on a tiny config, with a tiny saved SSL-layout encoder."""

import json

import numpy as np
import pytest
import torch

from pipeline.assign import assign
from pipeline.features import (
    EXTRACT_STREAM,
    TOKENIZE_STREAM,
    CropSpec,
    ViewPlan,
    index_shard,
    open_features,
    random_resized_crop,
    sample_count,
)
from pipeline.inspect import inspect_artifact
from pipeline.io import read_json, write_json
from pipeline.kmeans import KMeansError, sample_patches, sample_rows
from pipeline.pixel_vq import load_pixel_vq, to_model_range
from pipeline.prepare import read_manifest
from pipeline.shards import iter_samples, list_shards
from pipeline.stream import read_token_meta
from pipeline.tokenizer import DigitTokenizer, encoder_from_params, tokenize_views
from stages import extract, kmeans, prepare, tokenize, train_vq

from .conftest import tiny_params

N_TRAIN, N_VAL, SAMPLED, CHUNK = 24, 12, 12, 4  # 12 of 24 train images, chunk_images 5 → 3 chunks of 4


def _params(encoder_dir, **kw):
    vq = dict(
        train_vq__channels=8,
        train_vq__codebook_size=16,
        train_vq__codebook_dim=4,
        train_vq__train={"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
    )
    tiny = dict(
        encoder__source="ssl",
        encoder__weights=str(encoder_dir),
        kmeans__k=8,
        kmeans__sample_patches=150,
        extract__sample=0.5,
        extract__chunk_images=5,
        tokenize__batch_size=4,
        **vq,
    )
    return tiny_params(**{**tiny, **kw})


def _tokenize(params, root, out="tokens", **paths):
    return tokenize.run(
        params,
        kmeans=str(root / "kmeans"),
        images=str(root / "images"),
        vq=str(root / "vq"),
        out=str(root / out),
        **paths,
    )


def _chain(params, root):
    root.mkdir(parents=True, exist_ok=True)
    prepare.run(params, out=str(root / "images"))
    m_ext = extract.run(params, images=str(root / "images"), out=str(root / "features.zarr"))
    m_km = kmeans.run(params, features=str(root / "features.zarr"), out=str(root / "kmeans"))
    train_vq.run(params, images=str(root / "images"), out=str(root / "vq"), curves=str(root / "vq_curves"))
    return m_ext, m_km, _tokenize(params, root)


@pytest.fixture(scope="module")
def chain(one_thread, encoder_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    return root, _chain(_params(encoder_dir), root)


def _shard_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _samples(directory, split):
    return list(iter_samples(list_shards(directory, split)))


def _images(root, split):
    return np.stack([s["png"] for s in _samples(root / "images", split)])


def test_chain_outputs_follow_the_contract(chain):
    root, (m_ext, m_km, m_tok) = chain
    store = open_features(root / "features.zarr")
    assert store["train/patches"].shape == (SAMPLED, 16, 32) and store["train/patches"].dtype == np.float16
    assert "val" not in store, "nothing reads val features: the store holds the K-Means input only"
    assert store.attrs["source"] == "ssl" and store.attrs["layer"] == -3 and store.attrs["block_index"] == 0
    assert store.attrs["sample"] == {"requested": 0.5, "images": SAMPLED, "of": N_TRAIN, "seed": 0}
    assert store.attrs["view"]["mode"] == "random" and len(store.attrs["weights_sha256"]) == 64
    assert m_ext["sampled_images"] == SAMPLED and m_ext["chunks"] == 3 and m_ext["chunks_resumed"] == 0
    assert m_ext["store_bytes"] >= SAMPLED * 16 * 32 * 2
    centroids = np.load(root / "kmeans/centroids.npy")
    assert centroids.shape == (8, 32) and centroids.dtype == np.float32
    assert read_json(root / "kmeans/kmeans.json")["encoder"]["sample"]["images"] == SAMPLED
    for key in ("inertia", "seconds", "usage_entropy_bits", "dead_clusters"):
        assert key in m_km
    samples = _samples(root / "tokens", "val")
    images = _samples(root / "images", "val")
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in images]
    assert [s["cls"] for s in samples] == [s["cls"] for s in images]
    assert set(samples[0]) == {"__key__", "__url__", "digit.npy", "vq.npy", "cls"}  # V = 1: no extra views
    tokens = np.stack([s["digit.npy"] for s in samples])
    assert tokens.dtype == np.uint16 and tokens.shape == (N_VAL, 4, 4) and tokens.max() < 8
    # pixel-VQ tokens of the same images: 32 px / 4 (stem) / 2 (one halving) = 4×4 grid of ids < 16
    vq = np.stack([s["vq.npy"] for s in samples])
    assert vq.dtype == np.uint16 and vq.shape == (N_VAL, 4, 4) and vq.max() < 16
    assert m_tok["val_images"] == N_VAL and m_tok["train_images"] == N_TRAIN and m_tok["views"] == 1
    meta = read_token_meta(root / "tokens")
    assert meta["digit"] == {"field": "digit.npy", "vocab": 8, "grid": [4, 4]}
    assert meta["vq"] == {"field": "vq.npy", "vocab": 16, "grid": [4, 4]}
    assert meta["views"] == 1 and meta["num_classes"] == 10 and meta["classes"][0] == "circle"
    assert sorted(p.name for p in (root / "tokens").iterdir())[0] == "meta.json"  # no bookkeeping left
    assert not (root / "tokens.partial").exists()


def test_store_holds_exactly_the_sampled_images(chain, encoder_dir):
    root, _ = chain
    params = _params(encoder_dir)
    store = open_features(root / "features.zarr")
    rows = np.asarray(store["train/rows"][:])
    np.testing.assert_array_equal(rows, sample_rows(N_TRAIN, SAMPLED, params.extract.seed))
    manifest = [r for r in read_manifest(root / "images").to_pylist() if r["split"] == "train"]
    assert [str(k) for k in store["train/keys"][:]] == [manifest[r]["key"] for r in rows]
    assert store["train/labels"][:].tolist() == [manifest[r]["label"] for r in rows]
    # Each stored row is the encoder's features of that image's K-Means view (crop seeded by (seed, row)),
    # computed in the stage's batches (chunks of 4 images, each one batch).
    encoder = encoder_from_params(params.encoder, params.base)
    plan = ViewPlan(count=1, centre=0, crop=CropSpec(), seed=0, stream=EXTRACT_STREAM)
    train = _images(root, "train")
    views = np.stack([plan.make(train[r], "train", r)[0] for r in rows])
    assert not np.array_equal(views, train[rows]), "K-Means views are crops + flips, not the stored images"
    want = np.concatenate(
        [encoder.patch_features(views[i : i + CHUNK]).half().numpy() for i in range(0, SAMPLED, CHUNK)]
    )
    np.testing.assert_array_equal(np.asarray(store["train/patches"][:]), want)
    assert store["train/chunk_done"][:].tolist() == [1, 1, 1]


def test_sample_counts_fractions_and_centre_views(chain, encoder_dir, tmp_path):
    root, _ = chain
    assert sample_count(1.0, 24) == 24 and sample_count(0.1, 24) == 2 and sample_count(0.001, 24) == 1
    assert sample_count(5, 24) == 5 and sample_count(100, 24) == 24
    params = _params(encoder_dir, extract__sample=7, extract__view="center", extract__seed=3)
    m = extract.run(params, images=str(root / "images"), out=str(tmp_path / "f.zarr"))
    store = open_features(tmp_path / "f.zarr")
    rows = np.asarray(store["train/rows"][:])
    assert m["sampled_images"] == 7 and m["chunks"] == 2  # of 4 and 3 images
    np.testing.assert_array_equal(rows, sample_rows(N_TRAIN, 7, 3))
    encoder = encoder_from_params(params.encoder, params.base)
    train = _images(root, "train")[rows]
    want = np.concatenate([encoder.patch_features(train[i : i + 4]).half().numpy() for i in (0, 4)])
    np.testing.assert_array_equal(np.asarray(store["train/patches"][:]), want)


def test_fused_tokens_equal_float64_brute_force_with_near_ties(chain, encoder_dir):
    root, _ = chain
    params = _params(encoder_dir)
    encoder = encoder_from_params(params.encoder, params.base)
    images = torch.from_numpy(_images(root, "val"))  # [12, 32, 32, 3]
    feats = encoder.patch_features(images).reshape(-1, 32)  # the fp32 features tokenize_views computes
    rng = np.random.default_rng(0)
    x = feats.numpy()
    # Near-ties: pairs of centroids mirrored about a patch's own feature, x ± d with |d| = 1 and the second
    # one stretched by δ ~ 1e-6, so the two distances differ far below the fp32 expansion's rounding error;
    # plus an exact duplicate (ties go to the lowest index) and a few plain centroids.
    picks = rng.choice(len(x), 24, replace=False)
    d = rng.standard_normal((24, 32))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    delta = rng.uniform(-2e-6, 2e-6, (24, 1))
    pairs = np.concatenate([x[picks] + d, x[picks] - (1 + delta) * d])
    plain = x[rng.choice(len(x), 6, replace=False)] + rng.standard_normal((6, 32))
    centroids = np.concatenate([pairs, plain, pairs[:1]]).astype(np.float32)
    c64 = centroids.astype(np.float64)
    dist = ((x.astype(np.float64)[:, None] - c64[None]) ** 2).sum(-1)
    brute = dist.argmin(1)
    naive = (x**2).sum(1)[:, None] - 2 * x @ centroids.T + (centroids**2).sum(1)[None]
    assert (naive.argmin(1) != brute).any(), "the set must hold ties the plain fp32 expansion gets wrong"
    vq = load_pixel_vq(root / "vq")
    digit, pixel = tokenize_views(DigitTokenizer(encoder, centroids), vq, images[None])
    assert digit.shape == (N_VAL, 1, 4, 4) and pixel.shape == (N_VAL, 1, 4, 4)
    np.testing.assert_array_equal(digit.reshape(-1).numpy(), brute)
    assert not (digit == len(centroids) - 1).any()  # the duplicate of centroid 0 never wins
    np.testing.assert_array_equal(pixel[:, 0].numpy(), vq.encode(to_model_range(images.numpy())).numpy())


def test_views_centre_first_reproducible_and_shared_by_both_tokenizers(chain, encoder_dir, tmp_path):
    root, _ = chain
    params = _params(encoder_dir, tokenize__views=3, tokenize__workers=0)
    m = _tokenize(params, root, out="tok3")
    assert m["views"] == 3
    meta = read_token_meta(root / "tok3")
    assert meta["views"] == 3 and meta["digit"]["views_field"] == "digit_views.npy"
    assert meta["vq"]["views_field"] == "vq_views.npy"
    one, three = _samples(root / "tokens", "val"), _samples(root / "tok3", "val")
    for a, b in zip(one, three, strict=True):  # view 0 is the V = 1 run's tokens, bit for bit
        np.testing.assert_array_equal(a["digit.npy"], b["digit.npy"])
        np.testing.assert_array_equal(a["vq.npy"], b["vq.npy"])
        assert b["digit_views.npy"].shape == (2, 4, 4) and b["digit_views.npy"].dtype == np.uint16
        assert b["vq_views.npy"].shape == (2, 4, 4) and b["vq_views.npy"].dtype == np.uint16
    # Views 1..2 are crops + flips seeded by (seed, image, view): recompute them independently.
    encoder = encoder_from_params(params.encoder, params.base)
    centroids = np.load(root / "kmeans/centroids.npy")
    vq = load_pixel_vq(root / "vq")
    images = _images(root, "val")
    plan = ViewPlan(count=3, centre=1, crop=CropSpec(), seed=0, stream=TOKENIZE_STREAM)
    for view in (1, 2):
        crops = np.stack(
            [random_resized_crop(im, plan.rng("val", r, view), CropSpec()) for r, im in enumerate(images)]
        )
        batches = [crops[i : i + 4] for i in range(0, N_VAL, 4)]  # the stage's batch size
        digit = np.concatenate([DigitTokenizer(encoder, centroids)(b)[0].numpy() for b in batches])
        pixel = np.concatenate([vq.encode(to_model_range(b)).numpy() for b in batches])
        np.testing.assert_array_equal(np.stack([s["digit_views.npy"][view - 1] for s in three]), digit)
        np.testing.assert_array_equal(np.stack([s["vq_views.npy"][view - 1] for s in three]), pixel)
    changed = np.mean([(s["digit_views.npy"] != s["digit.npy"]).mean() for s in three])
    assert changed > 0.05, changed  # other views are other tokens
    # Same params → the same bytes (DataLoader workers or not); another seed → other crops.
    _tokenize(_params(encoder_dir, tokenize__views=3, tokenize__workers=2), root, out="tok3b")
    assert _shard_bytes(root / "tok3") == _shard_bytes(root / "tok3b")
    _tokenize(_params(encoder_dir, tokenize__views=3, tokenize__seed=1), root, out="tok3c")
    other = _samples(root / "tok3c", "val")
    assert any(
        not np.array_equal(a["digit_views.npy"], b["digit_views.npy"])
        for a, b in zip(three, other, strict=True)
    )
    assert all(np.array_equal(a["digit.npy"], b["digit.npy"]) for a, b in zip(three, other, strict=True))


def test_two_runs_give_identical_centroids_and_tokens(chain, encoder_dir, tmp_path):
    root, _ = chain
    _chain(_params(encoder_dir), tmp_path)
    assert (tmp_path / "kmeans/centroids.npy").read_bytes() == (root / "kmeans/centroids.npy").read_bytes()
    assert _shard_bytes(tmp_path / "tokens") == _shard_bytes(root / "tokens")


def test_interrupted_extract_resumes_to_the_same_store(chain, encoder_dir, tmp_path, monkeypatch):
    root, _ = chain
    params = _params(encoder_dir)
    calls = {"n": 0}
    real = extract.extract_chunk

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "extract_chunk", dies_on_third)
    out = tmp_path / "features.zarr"
    with pytest.raises(KeyboardInterrupt):
        extract.run(params, images=str(root / "images"), out=str(out))
    assert not out.exists(), "an interrupted extract must not leave a finished-looking store"
    assert (tmp_path / "features.zarr.partial").exists()
    monkeypatch.setattr(extract, "extract_chunk", real)
    m = extract.run(params, images=str(root / "images"), out=str(out))
    assert m["chunks_resumed"] == 2
    assert not (tmp_path / "features.zarr.partial").exists()
    a, b = open_features(out), open_features(root / "features.zarr")
    for name in ("patches", "rows", "labels", "keys", "chunk_done"):
        np.testing.assert_array_equal(a[f"train/{name}"][:], b[f"train/{name}"][:])


def test_partial_store_from_other_settings_is_discarded(chain, encoder_dir, tmp_path, monkeypatch):
    root, _ = chain

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "extract_chunk", boom)
    with pytest.raises(KeyboardInterrupt):
        extract.run(
            _params(encoder_dir, extract__seed=1), images=str(root / "images"), out=str(tmp_path / "f.zarr")
        )
    monkeypatch.undo()
    m = extract.run(_params(encoder_dir), images=str(root / "images"), out=str(tmp_path / "f.zarr"))
    assert m["chunks_resumed"] == 0
    assert open_features(tmp_path / "f.zarr").attrs["sample"]["seed"] == 0


def test_interrupted_tokenize_resumes_from_finished_shards(chain, encoder_dir, tmp_path, monkeypatch):
    root, _ = chain
    params = _params(encoder_dir)
    calls = {"n": 0}
    real = tokenize.tokenize_shard

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenize, "tokenize_shard", dies_on_third)
    paths = dict(kmeans=str(root / "kmeans"), images=str(root / "images"), vq=str(root / "vq"))
    out = tmp_path / "tokens"
    with pytest.raises(KeyboardInterrupt):
        tokenize.run(params, out=str(out), **paths)
    assert not out.exists(), "an interrupted tokenize must not leave a finished-looking output"
    partial = tmp_path / "tokens.partial"
    assert sorted(p.name for p in partial.glob("*.tar")) == ["train-00000.tar", "train-00001.tar"]
    before = {p.name: p.stat().st_mtime_ns for p in partial.glob("*.tar")}
    monkeypatch.setattr(tokenize, "tokenize_shard", real)
    m = tokenize.run(params, out=str(out), **paths)
    assert m["shards_resumed"] == 2 and not partial.exists()
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before  # kept, not rewritten
    assert _shard_bytes(out) == _shard_bytes(root / "tokens")
    fresh = chain[1][2]  # usage figures of resumed shards come from their saved counts
    assert {k: v for k, v in m.items() if k != "shards_resumed"} == {
        k: v for k, v in fresh.items() if k != "shards_resumed"
    }
    # A partial output from other settings is not resumed.
    monkeypatch.setattr(tokenize, "tokenize_shard", dies_on_third)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        tokenize.run(_params(encoder_dir, tokenize__seed=5, tokenize__views=2), out=str(out), **paths)
    monkeypatch.setattr(tokenize, "tokenize_shard", real)
    assert tokenize.run(params, out=str(out), **paths)["shards_resumed"] == 0


def test_tokenize_refuses_mismatched_codebook_or_encoder(chain, encoder_dir, tmp_path):
    root, _ = chain
    (tmp_path / "km").mkdir()
    np.save(tmp_path / "km/centroids.npy", np.zeros((4, 5), np.float32))
    paths = dict(images=str(root / "images"), vq=str(root / "vq"), out=str(tmp_path / "tok"))
    with pytest.raises(ValueError, match=r"km/centroids.npy has shape \[4, 5\] \(D=5\).*D=32") as e:
        tokenize.run(_params(encoder_dir), kmeans=str(tmp_path / "km"), **paths)
    assert str(encoder_dir) in str(e.value)
    # Centroids of the right shape, fitted on another encoder's features (kmeans.json says which).
    np.save(tmp_path / "km/centroids.npy", np.load(root / "kmeans/centroids.npy"))
    meta = read_json(root / "kmeans/kmeans.json")
    meta["encoder"]["weights_sha256"] = "0" * 64
    meta["encoder"]["layer"] = -1
    write_json(tmp_path / "km/kmeans.json", meta)
    with pytest.raises(ValueError, match=r"km/kmeans.json: the centroids were fitted on .*layer -1 vs -3"):
        tokenize.run(_params(encoder_dir), kmeans=str(tmp_path / "km"), **paths)
    assert not (tmp_path / "tok").exists() and not (tmp_path / "tok.partial").exists()


def test_kmeans_refuses_a_store_with_too_few_patches(chain, encoder_dir, tmp_path):
    root, _ = chain
    params = _params(encoder_dir, extract__sample=1, kmeans__k=20)
    extract.run(params, images=str(root / "images"), out=str(tmp_path / "f.zarr"))
    with pytest.raises(ValueError, match=r"holds 16 patches \(1 images × 16\) but kmeans.k = 20"):
        kmeans.run(params, features=str(tmp_path / "f.zarr"), out=str(tmp_path / "km"))


def test_index_shard_lists_members_in_order(chain):
    root, _ = chain
    entries = index_shard(root / "images/val-00000.tar")
    images = _samples(root / "images", "val")[:10]
    assert [e.key for e in entries] == [s["__key__"] for s in images]
    assert [e.label for e in entries] == [s["cls"] for s in images]
    raw = (root / "images/val-00000.tar").read_bytes()
    assert raw[entries[3].offset : entries[3].offset + 8] == b"\x89PNG\r\n\x1a\n"


def test_imported_centroids_skip_kmeans_and_report_usage_on_the_sample(
    chain, encoder_dir, tmp_path, monkeypatch
):
    root, (_, m_km, _) = chain
    # the authors' release is a bare [K, D] float array; here: other centroids of the right shape
    given = np.random.default_rng(0).normal(size=(8, 32)).astype(np.float64)
    np.save(tmp_path / "km_given.npy", given)

    def no_fit(*a, **kw):
        raise AssertionError("K-Means ran although centroids were given")

    monkeypatch.setattr(kmeans, "fit_kmeans", no_fit)
    params = _params(encoder_dir, kmeans__centroids=str(tmp_path / "km_given.npy"))
    m = kmeans.run(params, features=str(root / "features.zarr"), out=str(tmp_path / "kmeans"))
    saved = np.load(tmp_path / "kmeans/centroids.npy")
    assert saved.dtype == np.float32 and np.array_equal(saved, given.astype(np.float32))
    # usage on the same sample of train patches the fit used
    x = sample_patches(
        open_features(root / "features.zarr")["train/patches"],
        params.kmeans.sample_patches,
        params.kmeans.seed,
    )
    counts = np.bincount(assign(x, saved), minlength=8)
    assert np.array_equal(np.load(tmp_path / "kmeans/usage.npy"), counts)
    assert (
        m["imported"] == 1
        and m["n_points"] == params.kmeans.sample_patches
        and m["dead_clusters"] == int((counts == 0).sum())
    )
    assert m["mean_sq_distance"] > m_km["mean_sq_distance"]  # random centroids fit worse than K-Means'
    meta = json.loads((tmp_path / "kmeans/kmeans.json").read_text())
    assert (
        meta["imported_from"]["path"] == str(tmp_path / "km_given.npy")
        and len(meta["imported_from"]["sha256"]) == 64
    )
    # the fitted codebook imported back gives the fitted codebook (and so the same tokens)
    again = _params(encoder_dir, kmeans__centroids=str(root / "kmeans/centroids.npy"))
    kmeans.run(again, features=str(root / "features.zarr"), out=str(tmp_path / "same"))
    assert (tmp_path / "same/centroids.npy").read_bytes() == (root / "kmeans/centroids.npy").read_bytes()
    assert np.array_equal(np.load(tmp_path / "same/usage.npy"), np.load(root / "kmeans/usage.npy"))


def test_imported_centroids_of_another_encoder_are_a_clear_error(chain, encoder_dir, tmp_path):
    root, _ = chain
    np.save(tmp_path / "km_768.npy", np.zeros((8, 768), np.float32))
    params = _params(encoder_dir, kmeans__centroids=str(tmp_path / "km_768.npy"))
    with pytest.raises(
        KMeansError, match=r"km_768.npy has D=768, but the encoder's features have D=32 \(.*ssl"
    ):
        kmeans.run(params, features=str(root / "features.zarr"), out=str(tmp_path / "out"))
    np.save(tmp_path / "km_k.npy", np.zeros((16, 32), np.float32))
    with pytest.raises(KMeansError, match="has K=16 centroids but kmeans.k is 8"):
        kmeans.run(
            _params(encoder_dir, kmeans__centroids=str(tmp_path / "km_k.npy")),
            features=str(root / "features.zarr"),
            out=str(tmp_path / "out"),
        )
    with pytest.raises(KMeansError, match="is not a file"):
        kmeans.run(
            _params(encoder_dir, kmeans__centroids=str(tmp_path / "missing.npy")),
            features=str(root / "features.zarr"),
            out=str(tmp_path / "out"),
        )
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_assign_is_used_consistently(chain):
    root, _ = chain
    centroids = np.load(root / "kmeans/centroids.npy")
    x = np.random.default_rng(0).normal(size=(50, 32)).astype(np.float32)
    np.testing.assert_array_equal(
        assign(x, centroids), ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    )


def test_inspect_views_of_tokenizer_artifacts(chain, tmp_path):
    root, _ = chain
    text = inspect_artifact(root / "features.zarr", tmp_path)
    assert f"train: patches float16 [{SAMPLED}, 16, 32]" in text and "source=ssl" in text
    assert f"K-Means input: {SAMPLED} of {N_TRAIN} train images" in text and "random views" in text
    text = inspect_artifact(root / "kmeans", tmp_path)
    assert "[K=8, D=32]" in text and "dead clusters" in text
    text = inspect_artifact(root / "tokens", tmp_path)
    assert "val: 12 images" in text and "digit.npy: grid [4, 4]" in text
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(names) == 3, names
    assert json.loads((root / "tokens/meta.json").read_text())["views"] == 1
