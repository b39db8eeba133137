"""prepare → extract → kmeans → tokenize on a tiny config, with a tiny saved SSL-layout encoder."""

import json

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pipeline.assign import assign
from pipeline.checkpoint import save_checkpoint
from pipeline.features import open_features
from pipeline.inspect import inspect_artifact
from pipeline.kmeans import KMeansError, sample_patches
from pipeline.shards import iter_samples, list_shards
from pipeline.stream import read_token_meta
from stages import extract, kmeans, prepare, tokenize, train_vq

from .conftest import tiny_params

TIMM_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    torch.manual_seed(0)
    vit = VisionTransformer(**TIMM_KWARGS)
    d = tmp_path_factory.mktemp("enc") / "encoder"
    save_checkpoint(
        d,
        vit.state_dict(),
        {
            "kind": "ssl_vit",
            "timm_kwargs": TIMM_KWARGS,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "img_size": 32,
            "patch_size": 8,
        },
    )
    return d


def _params(encoder_dir, **kw):
    vq = dict(
        train_vq__channels=8,
        train_vq__codebook_size=16,
        train_vq__codebook_dim=4,
        train_vq__train={"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
    )
    return tiny_params(encoder__weights=str(encoder_dir), kmeans__k=8, kmeans__sample_patches=300, **vq, **kw)


def _chain(params, root):
    root.mkdir(parents=True, exist_ok=True)
    prepare.run(params, out=str(root / "images"))
    m_ext = extract.run(params, images=str(root / "images"), out=str(root / "features.zarr"))
    m_km = kmeans.run(params, features=str(root / "features.zarr"), out=str(root / "kmeans"))
    train_vq.run(params, images=str(root / "images"), out=str(root / "vq"), curves=str(root / "vq.tsv"))
    m_tok = tokenize.run(
        params,
        features=str(root / "features.zarr"),
        kmeans=str(root / "kmeans"),
        images=str(root / "images"),
        vq=str(root / "vq"),
        out=str(root / "tokens"),
    )
    return m_ext, m_km, m_tok


@pytest.fixture(scope="module")
def chain(encoder_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    return root, _chain(_params(encoder_dir), root)


def test_chain_outputs_follow_the_contract(chain):
    root, (m_ext, m_km, m_tok) = chain
    store = open_features(root / "features.zarr")
    assert store["train/patches"].shape == (24, 16, 32) and store["train/patches"].dtype == np.float16
    assert store["val/patches"].shape == (12, 16, 32)
    assert store.attrs["source"] == "ssl" and store.attrs["layer"] == -3 and store.attrs["block_index"] == 0
    assert len(store.attrs["weights_sha256"]) == 64
    assert m_ext["tokens_per_image"] == 16 and m_ext["shards_resumed"] == 0
    centroids = np.load(root / "kmeans/centroids.npy")
    assert centroids.shape == (8, 32) and centroids.dtype == np.float32
    for key in ("inertia", "seconds", "usage_entropy_bits", "dead_clusters"):
        assert key in m_km
    # every token equals the brute-force nearest centroid of its stored feature; keys follow the images
    feats = np.asarray(store["val/patches"][:], dtype=np.float32)
    brute = ((feats[:, :, None, :] - centroids[None, None]) ** 2).sum(-1).argmin(-1)
    samples = list(iter_samples(list_shards(root / "tokens", "val")))
    tokens = np.stack([s["digit.npy"] for s in samples])
    assert tokens.dtype == np.uint16 and tokens.shape == (12, 4, 4)
    np.testing.assert_array_equal(tokens.reshape(12, 16), brute)
    images = list(iter_samples(list_shards(root / "images", "val")))
    assert [s["__key__"] for s in samples] == [s["__key__"] for s in images]
    assert [s["cls"] for s in samples] == [s["cls"] for s in images]
    assert m_tok["val_images"] == 12 and m_tok["train_images"] == 24
    # pixel-VQ tokens of the same images: 32 px / 4 (stem) / 2 (one halving) = 4×4 grid of ids < 16
    vq = np.stack([s["vq.npy"] for s in samples])
    assert vq.dtype == np.uint16 and vq.shape == (12, 4, 4) and vq.max() < 16
    meta = read_token_meta(root / "tokens")
    assert meta["digit"] == {"field": "digit.npy", "vocab": 8, "grid": [4, 4]}
    assert meta["vq"] == {"field": "vq.npy", "vocab": 16, "grid": [4, 4]}
    assert meta["num_classes"] == 10 and meta["classes"][0] == "circle"


def test_two_runs_give_identical_centroids_and_tokens(chain, encoder_dir, tmp_path):
    root, _ = chain
    _chain(_params(encoder_dir), tmp_path)
    assert (tmp_path / "kmeans/centroids.npy").read_bytes() == (root / "kmeans/centroids.npy").read_bytes()
    for shard in sorted((root / "tokens").glob("*.tar")):
        assert shard.read_bytes() == (tmp_path / "tokens" / shard.name).read_bytes()


def test_interrupted_extract_resumes_to_the_same_store(chain, encoder_dir, tmp_path, monkeypatch):
    root, _ = chain
    params = _params(encoder_dir)
    calls = {"n": 0}
    real = extract.extract_shard

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, "extract_shard", dies_on_third)
    out = tmp_path / "features.zarr"
    with pytest.raises(KeyboardInterrupt):
        extract.run(params, images=str(root / "images"), out=str(out))
    assert not out.exists(), "an interrupted extract must not leave a finished-looking store"
    assert (tmp_path / "features.zarr.partial").exists()
    monkeypatch.setattr(extract, "extract_shard", real)
    m = extract.run(params, images=str(root / "images"), out=str(out))
    assert m["shards_resumed"] == 2
    assert not (tmp_path / "features.zarr.partial").exists()
    a, b = open_features(out), open_features(root / "features.zarr")
    for split in ("train", "val"):
        for name in ("patches", "labels", "keys"):
            np.testing.assert_array_equal(a[f"{split}/{name}"][:], b[f"{split}/{name}"][:])


def test_partial_store_from_other_settings_is_discarded(chain, encoder_dir, tmp_path, monkeypatch):
    root, _ = chain

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(extract, "extract_shard", boom)
    with pytest.raises(KeyboardInterrupt):
        extract.run(
            _params(encoder_dir, encoder__layer=-1), images=str(root / "images"), out=str(tmp_path / "f.zarr")
        )
    monkeypatch.undo()
    m = extract.run(_params(encoder_dir), images=str(root / "images"), out=str(tmp_path / "f.zarr"))
    assert m["shards_resumed"] == 0


def test_tokenize_refuses_mismatched_codebook(chain, tmp_path):
    root, _ = chain
    (tmp_path / "km").mkdir()
    np.save(tmp_path / "km/centroids.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(ValueError, match="D=5.*D=32"):
        tokenize.run(
            tiny_params(),
            features=str(root / "features.zarr"),
            kmeans=str(tmp_path / "km"),
            images=str(root / "images"),
            vq=str(root / "vq"),
            out=str(tmp_path / "tok"),
        )
    assert not (tmp_path / "tok").exists()


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
    x = sample_patches(open_features(root / "features.zarr")["train/patches"], 300, params.kmeans.seed)
    counts = np.bincount(assign(x, saved), minlength=8)
    assert np.array_equal(np.load(tmp_path / "kmeans/usage.npy"), counts)
    assert m["imported"] == 1 and m["n_points"] == 300 and m["dead_clusters"] == int((counts == 0).sum())
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
    assert "train: patches float16 [24, 16, 32]" in text and "source=ssl" in text
    text = inspect_artifact(root / "kmeans", tmp_path)
    assert "[K=8, D=32]" in text and "dead clusters" in text
    text = inspect_artifact(root / "tokens", tmp_path)
    assert "val: 12 images" in text and "digit.npy: grid [4, 4]" in text
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(names) == 3, names
