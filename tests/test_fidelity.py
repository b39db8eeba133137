import json
import math

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from pipeline.checkpoint import CheckpointError, save_checkpoint
from pipeline.metrics import fidelity
from pipeline.metrics.fidelity import (
    JUDGE_EXTRACTOR,
    METRIC_KEYS,
    FidelityError,
    compute_fidelity,
    reference_stats,
)
from pipeline.models.judge import (
    Judge,
    JudgeConfig,
    evaluate_accuracy,
    judge_batches,
    load_judge,
    save_judge,
    to_judge_input,
)
from pipeline.shards import write_shard
from pipeline.stream import ShardStream

# Four trivially separable classes: solid colours, jittered per image, plus pixel noise.
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=np.float32)
TINY = JudgeConfig(num_classes=4, image_size=16, widths=(8, 16), stem_stride=2, blocks_per_stage=0)
FAST = dict(
    kid_subsets=50, kid_subset_size=20, isc_splits=2, seed=0, batch_size=16, device="cpu", verbose=False
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation cost on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def colour_images(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(COLOURS)
    base = COLOURS[labels] + rng.uniform(-25, 25, (n, 3))
    img = base[:, None, None, :] + rng.normal(0, 8, (n, size, size, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def brighten(images: np.ndarray, amount: int) -> np.ndarray:
    return np.clip(images.astype(np.int16) + amount, 0, 255).astype(np.uint8)


def colour_stream(tmp_dir, n: int, seed: int, batch: int, rank: int = 0, world: int = 1) -> ShardStream:
    """colour_images written to two shards and streamed back the way train_judge reads its images."""
    images, labels = colour_images(n, seed=seed)
    half = n // 2
    for i, (a, b) in enumerate(((0, half), (half, n))):
        write_shard(
            tmp_dir / f"train-{i:05d}.tar",
            ((f"img_{j:05d}", {"png": images[j], "cls": int(labels[j])}) for j in range(a, b)),
        )
    shards = sorted(tmp_dir.glob("train-*.tar"))
    return ShardStream(shards, {"image": "png", "label": "cls"}, batch, seed, rank, world)


def train_tiny_judge(seed: int, tmp_dir, steps: int = 60) -> Judge:
    """A minimal loop (the shared pipeline/train.py is not needed for a 60-step fit)."""
    torch.manual_seed(seed)
    model = Judge(TINY)
    batches = judge_batches(colour_stream(tmp_dir, 256, 100 + seed, 32), TINY.image_size, seed)(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss, logs = model.training_loss(next(batches))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    model = train_tiny_judge(seed=0, tmp_dir=tmp_path_factory.mktemp("judge_shards"))
    images, labels = colour_images(64, seed=999)
    chw = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert evaluate_accuracy(model, chw, torch.from_numpy(labels)) == 1.0
    return save_judge(tmp_path_factory.mktemp("judge") / "judge", model, {"val_acc": 1.0})


@pytest.fixture(scope="module")
def real():
    return colour_images(40, seed=1)[0]


# ---------------------------------------------------------------- the judge model


def test_judge_protocol_and_shapes():
    torch.manual_seed(0)
    model = Judge(TINY)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    loss, logs = model.training_loss({"image": x, "label": torch.tensor([0, 1, 2, 3, 0])})
    assert loss.dim() == 0 and loss.requires_grad
    assert set(logs) == {"acc"} and 0.0 <= logs["acc"] <= 1.0
    model.eval()
    assert model.features(x).shape == (5, TINY.feature_dim)
    assert model.logits(x).shape == (5, 4)
    with pytest.raises(ValueError, match=r"Judge expects float images \[B, 3, 16, 16\]"):
        model.features(torch.rand(2, 3, 32, 32))


def test_judge_config_validation():
    with pytest.raises(ValueError, match="must be divisible by 16"):
        JudgeConfig(image_size=40, widths=(8, 16, 32, 64), stem_stride=2)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        JudgeConfig(num_classes=1)


def test_to_judge_input_range_and_resize():
    x = torch.tensor([0, 255], dtype=torch.uint8).repeat(1, 3, 8, 4)  # [1, 3, 8, 8] alternating columns
    y = to_judge_input(x, 8)
    assert y.min().item() == -1.0 and y.max().item() == 1.0
    assert to_judge_input(x, 4).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="expected uint8 images"):
        to_judge_input(x.float(), 8)


def test_judge_batches_deterministic_and_rank_split(tmp_path):
    def batch(step, rank=0, world=1):
        stream = colour_stream(tmp_path, 50, 3, 8, rank, world)
        return next(judge_batches(stream, 16, seed=1)(step))

    full, again = batch(7), batch(7)
    assert full["image"].shape == (8, 3, 16, 16) and full["image"].dtype == torch.float32
    assert torch.equal(full["image"], again["image"]) and torch.equal(full["label"], again["label"])
    r0, r1 = batch(7, 0, 2), batch(7, 1, 2)  # each rank takes its half of the global batch, flips included
    assert torch.equal(torch.cat([r0["image"], r1["image"]]), full["image"])
    assert torch.equal(torch.cat([r0["label"], r1["label"]]), full["label"])
    assert not torch.equal(batch(8)["image"], full["image"])
    flipped = judge_batches(colour_stream(tmp_path, 50, 3, 8), 16, seed=1, flip=False)(7)
    plain = next(flipped)["image"]
    assert any(
        torch.equal(a, b.flip(2)) and not torch.equal(a, b) for a, b in zip(full["image"], plain, strict=True)
    )


def test_judge_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = Judge(TINY).eval()
    save_judge(tmp_path / "j", model)
    loaded = load_judge(tmp_path / "j")
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    assert torch.equal(model.logits(x), loaded.logits(x))
    save_checkpoint(tmp_path / "other", model.state_dict(), {"kind": "gpt", "config": {}})
    with pytest.raises(CheckpointError, match=r"kind is 'gpt', expected 'judge'"):
        load_judge(tmp_path / "other")


def test_extractor_is_registered_and_matches_the_judge(judge_dir, real):
    assert FEATURE_EXTRACTORS_REGISTRY[JUDGE_EXTRACTOR] is fidelity.JudgeFeatureExtractor
    fe = create_feature_extractor(
        JUDGE_EXTRACTOR,
        ["logits", "feat"],
        cuda=False,
        feature_extractor_weights_path=str(judge_dir),
        verbose=False,
    )
    x = torch.from_numpy(real[:6]).permute(0, 3, 1, 2)
    logits, feat = fe(x)
    judge = load_judge(judge_dir)
    assert torch.allclose(feat, judge.features(to_judge_input(x, 16)))
    assert torch.allclose(logits, judge.logits(to_judge_input(x, 16)))
    with pytest.raises(FidelityError, match="needs feature_extractor_weights_path"):
        create_feature_extractor(JUDGE_EXTRACTOR, ["feat"], cuda=False)


# ---------------------------------------------------------------- metrics


def test_metrics_of_a_set_against_itself_and_a_shifted_set(judge_dir, real):
    same = compute_fidelity(real, real, judge_dir=judge_dir, **FAST)
    assert set(same) == set(METRIC_KEYS)
    assert all(math.isfinite(v) for v in same.values())
    assert abs(same["fid"]) < 1e-3
    # KID is unbiased, so ~0 here; with 20-image subsets its spread over subsets is wide
    assert abs(same["kid_mean"]) < 2 * same["kid_std"]
    assert same["precision"] == 1.0 and same["recall"] == 1.0  # every point lies in its own k-NN ball

    shifted = compute_fidelity(brighten(real, 60), real, judge_dir=judge_dir, **FAST)
    assert shifted["fid"] > 1.0 and shifted["fid"] > 1000 * abs(same["fid"])
    assert shifted["kid_mean"] > same["kid_mean"] + shifted["kid_std"]
    assert shifted["precision"] < 0.5 and shifted["recall"] < 0.5
    # a smaller shift lands in between
    mild = compute_fidelity(brighten(real, 15), real, judge_dir=judge_dir, **FAST)
    assert same["fid"] < mild["fid"] < shifted["fid"]


def test_inception_score_of_confident_images_beats_noise(judge_dir, real):
    noise = np.random.default_rng(0).integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    confident = compute_fidelity(real, real, judge_dir=judge_dir, **FAST)
    noisy = compute_fidelity(noise, real, judge_dir=judge_dir, **FAST)
    assert 3.0 < confident["isc_mean"] <= 4.0 + 1e-6  # 4 balanced, confidently classified classes
    assert noisy["isc_mean"] < confident["isc_mean"] - 1.0


def test_stored_reference_equals_recompute(judge_dir, real, tmp_path):
    ref = reference_stats(
        real, tmp_path / "ref", judge_dir=judge_dir, batch_size=16, device="cpu", verbose=False
    )
    meta = json.loads((ref / "reference.json").read_text())
    assert meta["extractor"] == "judge" and meta["n"] == 40 and meta["image_size"] == [16, 16]
    assert len(meta["judge_sha256"]) == 64
    assert not (tmp_path / "ref.tmp").exists()

    fake = brighten(colour_images(30, seed=2)[0], 20)
    recomputed = compute_fidelity(fake, real, judge_dir=judge_dir, **FAST)
    stored = compute_fidelity(fake, reference=ref, judge_dir=judge_dir, **FAST)
    assert set(stored) == set(METRIC_KEYS)
    for key in METRIC_KEYS:
        assert stored[key] == pytest.approx(recomputed[key], rel=1e-9, abs=1e-12), key
    assert recomputed["fid"] > 0.1  # the comparison is not between zeros


def test_dataset_input_equals_array_input(judge_dir, real):
    class Items(Dataset):
        def __len__(self):
            return len(real)

        def __getitem__(self, i):
            return torch.from_numpy(real[i]).permute(2, 0, 1).contiguous()

    fake = brighten(real, 30)
    assert compute_fidelity(fake, Items(), judge_dir=judge_dir, **FAST) == compute_fidelity(
        fake, real, judge_dir=judge_dir, **FAST
    )


def test_reference_from_another_judge_is_refused(judge_dir, real, tmp_path):
    ref = reference_stats(
        real, tmp_path / "ref", judge_dir=judge_dir, batch_size=16, device="cpu", verbose=False
    )
    torch.manual_seed(5)
    other = save_judge(tmp_path / "other", Judge(TINY))
    with pytest.raises(FidelityError, match="judge_sha256"):
        compute_fidelity(real, reference=ref, judge_dir=other, **FAST)
    with pytest.raises(FidelityError, match="computed with extractor 'judge', not 'inception-v3-compat'"):
        fidelity._check_reference(
            json.loads((ref / "reference.json").read_text()), ref, "inception-v3-compat", {}
        )


def test_input_errors(judge_dir, real):
    with pytest.raises(FidelityError, match="exactly one of real"):
        compute_fidelity(real, judge_dir=judge_dir, **FAST)
    with pytest.raises(FidelityError, match=r"fake images are \[24, 24\] but real images are \[16, 16\]"):
        compute_fidelity(colour_images(40, seed=1, size=24)[0], real, judge_dir=judge_dir, **FAST)
    with pytest.raises(FidelityError, match=r"expected uint8 images \[N, H, W, 3\]"):
        compute_fidelity(real.astype(np.float32), real, judge_dir=judge_dir, **FAST)
    with pytest.raises(FidelityError, match="kid_subset_size=20 must be in"):
        compute_fidelity(real[:10], real, judge_dir=judge_dir, **FAST)
    with pytest.raises(FidelityError, match="extractor 'judge' needs judge_dir"):
        compute_fidelity(real, real, **FAST)
    with pytest.raises(FidelityError, match="extractor must be one of"):
        compute_fidelity(real, real, extractor="inception", **FAST)


# ---------------------------------------------------------------- torch-fidelity's Inception


def test_inception_missing_weights_file_is_a_clear_error(real, tmp_path):
    with pytest.raises(FidelityError, match=r"weights file .*nope\.pth does not exist"):
        compute_fidelity(
            real,
            real,
            extractor="inception-v3-compat",
            inception_weights=tmp_path / "nope.pth",
            verbose=False,
        )


def test_inception_weights_must_be_tensors_only(real, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "x": FidelityError("a pickled object")}, path)
    with pytest.raises(FidelityError, match="not a tensors-only state dict"):
        compute_fidelity(real, real, extractor="inception-v3-compat", inception_weights=path)


def test_inception_download_failure_says_what_to_do(real, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(url, dst, progress=True):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(
        FidelityError, match=r"download of https://github.com/toshas/.* failed .*inception_weights"
    ):
        compute_fidelity(real, real, extractor="inception-v3-compat")
