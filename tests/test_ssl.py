import itertools
import math

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from pipeline.checkpoint import load_checkpoint
from pipeline.live import read_curves
from pipeline.metrics.knn import knn_accuracy, knn_predict, mean_patch_features
from pipeline.ssl import (
    DINO,
    SSLConfig,
    ViewAugment,
    augment_view,
    export_encoder,
    image_batches,
    load_encoder,
    momentum_at,
    multi_crop,
    teacher_temp_at,
    train_config,
    vit_kwargs,
)
from pipeline.ssl.augment import gaussian_blur, random_grayscale, solarize
from pipeline.train import TrainingStopped, fit

torch.set_num_threads(2)

# 32x32 images, 4x4 patches of 8 px, 2 blocks of width 48: each step takes milliseconds.
TINY = dict(
    img_size=32,
    patch_size=8,
    embed_dim=48,
    depth=2,
    num_heads=3,
    out_dim=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    patch_out_dim=64,
    local_crops=2,
    local_crop_size=16,
    batch_size=4,
    steps=6,
    warmup_steps=1,
    warmup_teacher_temp_steps=2,
    lr=1e-3,
)


def tiny_cfg(**over) -> SSLConfig:
    return SSLConfig(**{**TINY, **over})


def images(n: int = 12, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def read_tsv(path):
    return read_curves(path)  # the dvclive curves fit writes (pipeline/live.py)


def test_patch_size_must_divide_img_size():
    with pytest.raises(ValueError, match="patch_size 6 must divide img_size 64"):
        vit_kwargs(img_size=64, patch_size=6)
    with pytest.raises(ValueError, match="patch_size 7 must divide img_size 32"):
        tiny_cfg(patch_size=7)
    with pytest.raises(ValueError, match="local_crop_size: 12 must be a multiple of patch_size 8"):
        tiny_cfg(local_crop_size=12)
    with pytest.raises(ValueError, match="unknown key.*lerning_rate"):
        SSLConfig.from_dict({"lerning_rate": 1.0})


def test_schedules():
    cfg = tiny_cfg(steps=11, momentum_start=0.9, teacher_temp=0.07, warmup_teacher_temp=0.04)
    assert momentum_at(cfg, 0) == pytest.approx(0.9)
    assert momentum_at(cfg, 5) == pytest.approx(0.95)  # half way along the cosine
    assert momentum_at(cfg, 10) == pytest.approx(1.0)
    assert [teacher_temp_at(cfg, s) for s in (0, 1, 2, 9)] == pytest.approx([0.04, 0.055, 0.07, 0.07])


def test_augmentation_is_deterministic_and_well_formed():
    x = torch.from_numpy(images(6)).permute(0, 3, 1, 2).float() / 255
    views = (ViewAugment(32, (0.3, 1.0), blur_p=1.0), ViewAugment(32, (0.3, 1.0), blur_p=0.1, solarize_p=0.2))
    local = ViewAugment(16, (0.1, 0.3), blur_p=0.5)
    a = multi_crop(x, views, local, 3, torch.Generator().manual_seed(1))
    b = multi_crop(x, views, local, 3, torch.Generator().manual_seed(1))
    c = multi_crop(x, views, local, 3, torch.Generator().manual_seed(2))
    assert a[0].shape == (12, 3, 32, 32) and a[1].shape == (18, 3, 16, 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].min() >= 0 and a[0].max() <= 1 and a[1].min() >= 0 and a[1].max() <= 1


def test_augmentation_ops():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g)
    assert torch.equal(gaussian_blur(x, 0.0, (0.5, 1.0), g), x)  # not chosen: a delta kernel
    blurred = gaussian_blur(x, 1.0, (1.0, 1.0), g)
    assert blurred.std() < 0.7 * x.std() and blurred.mean().item() == pytest.approx(x.mean().item(), abs=0.02)
    gray = random_grayscale(x, 1.0, g)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    assert torch.equal(solarize(x, 1.0, g), torch.where(x >= 0.5, 1 - x, x))
    # A crop of the whole image with every colour op off is a resampling of the image itself.
    plain = ViewAugment(16, (1.0, 1.0), blur_p=0.0, jitter_p=0.0, grayscale_p=0.0, flip_p=0.0)
    sq = torch.rand(2, 3, 16, 16, generator=g)
    out = augment_view(sq, plain, g)
    assert out.shape == sq.shape and (out - sq).abs().mean() < 0.15
    flipped = augment_view(
        sq, ViewAugment(16, (1.0, 1.0), blur_p=0.0, jitter_p=0.0, grayscale_p=0.0, flip_p=1.0), g
    )
    assert (flipped.flip(-1) - sq).abs().mean() < 0.15


def test_image_batches_are_a_function_of_the_step():
    imgs = images(10, 8)
    batches = image_batches(imgs, 4, seed=3)
    first = [b["image"] for b in itertools.islice(batches(0), 5)]  # 20 samples = two epochs
    assert first[0].shape == (4, 3, 8, 8) and first[0].dtype == torch.uint8
    later = next(batches(3))["image"]
    assert torch.equal(later, first[3])  # restarting at step 3 gives step 3's batch
    seen = torch.cat(first[:2] + [first[2][:2]])  # the first epoch: every image exactly once
    flat = {bytes(t.permute(1, 2, 0).numpy().tobytes()) for t in seen}
    assert flat == {bytes(im.tobytes()) for im in imgs}
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        image_batches(imgs.astype(np.float32), 4, 0)


def test_teacher_is_an_ema_of_the_student():
    cfg = tiny_cfg(momentum_start=0.9, ibot_weight=1.0)
    model = DINO(cfg)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss, _ = model.training_loss({"image": torch.from_numpy(images(4)).permute(0, 3, 1, 2)})
    loss.backward()
    opt.step()
    old = [p.clone() for p in model.teacher_parameters()]
    student = [p.detach().clone() for p in model.student_parameters()]
    assert any(not torch.equal(o, s) for o, s in zip(old, student, strict=True))  # the step moved the student
    model.after_optimizer_step(2)
    m = momentum_at(cfg, 2)
    assert 0.9 < m < 1.0
    for o, s, new in zip(old, student, model.teacher_parameters(), strict=True):
        torch.testing.assert_close(new, m * o + (1 - m) * s, rtol=1e-6, atol=1e-7)
    assert int(model.step) == 3
    assert not any(p.requires_grad for p in model.teacher_parameters())


def test_a_few_steps_with_the_shared_loop(tmp_path):
    # Collapse checks from step 0 with patience 1: a healthy start must not trip them.
    cfg = tiny_cfg(ibot_weight=1.0, collapse_warmup_steps=0, collapse_patience=1)
    model = DINO(cfg)
    teacher_before = [p.clone() for p in model.teacher_parameters()]
    summary = fit(
        model,
        image_batches(images(12), cfg.batch_size, cfg.seed),
        train_config(cfg, device="cpu"),
        tmp_path / "run",
        {"kind": "ssl_pretrain", "config": cfg.to_dict()},
        log_path=tmp_path / "curves",
        progress=False,
    )
    assert summary["steps_run"] == cfg.steps and math.isfinite(summary["final_loss"])
    rows = read_tsv(tmp_path / "curves")
    assert len(rows) == cfg.steps
    for key in ("dino_loss", "ibot_loss", "teacher_entropy", "teacher_batch_entropy", "feature_std"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert 0 < float(rows[-1]["teacher_entropy"]) < 1
    assert model.center.abs().sum() > 0 and model.patch_center.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, model.teacher_parameters(), strict=True))


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny_cfg(ibot_weight=1.0, steps=4)
    train = train_config(cfg, device="cpu", checkpoint_every=2)
    meta = {"kind": "ssl_pretrain", "config": cfg.to_dict()}
    data = images(6)
    ref = DINO(cfg)
    fit(ref, image_batches(data, cfg.batch_size, cfg.seed), train, tmp_path / "ref", meta, progress=False)

    def killed_at_3(start):
        for step, batch in zip(itertools.count(start), image_batches(data, cfg.batch_size, cfg.seed)(start)):
            if step == 3:
                raise KeyboardInterrupt("killed")
            yield batch

    with pytest.raises(KeyboardInterrupt):
        fit(DINO(cfg), killed_at_3, train, tmp_path / "run", meta, progress=False)
    assert load_checkpoint(tmp_path / "run" / "last")[1]["step"] == 2
    resumed = DINO(cfg)  # a fresh process: fit restores student, teacher, centres and the step
    summary = fit(
        resumed, image_batches(data, cfg.batch_size, cfg.seed), train, tmp_path / "run", meta, progress=False
    )
    assert summary["start_step"] == 2
    # Tolerance: exact on CPU (augmentations are a function of (seed, step, rank); the step is in the state).
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_collapse_detection_uniform_teacher(tmp_path):
    # A teacher temperature of 100 flattens every teacher output to (almost) uniform: a forced collapse.
    cfg = tiny_cfg(
        teacher_temp=100.0, warmup_teacher_temp=100.0, collapse_warmup_steps=2, collapse_patience=2
    )
    model = DINO(cfg)
    with pytest.raises(
        TrainingStopped, match=r"collapsed: teacher_entropy=(0\.9[89]|1\.00)\d* .* at step 3\b"
    ):
        fit(
            model,
            image_batches(images(12), cfg.batch_size, cfg.seed),
            train_config(cfg, device="cpu"),
            tmp_path / "run",
            {"kind": "ssl_pretrain"},
            progress=False,
        )


def test_collapse_detection_constant_features():
    # Zero the final norm's gain: every image gets the same representation (the norm's bias).
    cfg = tiny_cfg(collapse_warmup_steps=1, collapse_patience=3)
    model = DINO(cfg)
    with torch.no_grad():
        model.student_backbone.norm.weight.zero_()
    batch = {"image": torch.from_numpy(images(4)).permute(0, 3, 1, 2)}
    with pytest.raises(TrainingStopped, match=r"collapsed: feature_std=0\.0000 .* at step 3\b"):
        for step in range(10):
            model.training_loss(batch)
            model.after_optimizer_step(step)
    assert step == 3


def test_export_and_load_encoder(tmp_path):
    cfg = tiny_cfg(reg_tokens=2)
    model = DINO(cfg)
    with torch.no_grad():  # make teacher and student differ, to check which one is exported
        for p in model.student_backbone.parameters():
            p.add_(1.0)
    model.step.fill_(7)
    export_encoder(model, tmp_path / "enc")
    state, meta, _ = load_checkpoint(tmp_path / "enc")
    assert meta["kind"] == "ssl_vit" and meta["steps"] == 7
    assert (meta["img_size"], meta["patch_size"], meta["mean"]) == (32, 8, list(cfg.mean))
    rebuilt = VisionTransformer(**meta["timm_kwargs"])  # a "patch" stem needs nothing of ours
    rebuilt.load_state_dict(state, strict=True)
    vit, meta2 = load_encoder(tmp_path / "enc")
    assert meta2 == meta and not vit.training
    x = torch.randn(2, 3, 32, 32)
    model.teacher_backbone.eval()
    assert torch.equal(vit.forward_features(x), model.teacher_backbone.forward_features(x))
    assert not torch.equal(vit.forward_features(x), model.student_backbone.eval().forward_features(x))

    from pipeline.encoders import build_encoder

    enc = build_encoder("ssl", weights=tmp_path / "enc", layer=-1)
    assert enc.mean == cfg.mean and enc.num_tokens == 16 and enc.dim == 48


def test_conv_stem_round_trip_through_the_encoder_registry(tmp_path):
    from pipeline.encoders import build_encoder

    cfg = tiny_cfg(stem="conv")
    model = DINO(cfg)
    proj = model.student_backbone.patch_embed.proj
    strides = [m.stride[0] for m in proj if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 2, 2, 1]  # log2(patch 8) stride-2 convs, then the 1x1 projection
    # global and local crop sizes both go through it (dynamic image size)
    _, logs = model.training_loss({"image": torch.from_numpy(images(4)).permute(0, 3, 1, 2)})
    assert math.isfinite(logs["dino_loss"])
    export_encoder(model, tmp_path / "enc")
    vit, meta = load_encoder(tmp_path / "enc")
    assert meta["stem"] == "conv"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit.forward_features(x), model.teacher_backbone.eval().forward_features(x))
    enc = build_encoder("ssl", weights=tmp_path / "enc", layer=-1)
    assert enc.num_tokens == 16 and enc.dim == 48
    with pytest.raises(ValueError, match="stem"):
        tiny_cfg(stem="resnet")
    with pytest.raises(ValueError, match="power of two"):
        DINO(tiny_cfg(stem="conv", img_size=36, patch_size=6, local_crop_size=18))


def test_koleo_loss():
    from pipeline.ssl.dino import koleo_loss

    # four orthogonal unit vectors: every nearest neighbour is at distance sqrt(2)
    assert koleo_loss(torch.eye(4)).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-5)
    # scale does not matter (rows are normalised); bunching the rows up raises the loss
    assert koleo_loss(3 * torch.eye(4)).item() == pytest.approx(koleo_loss(torch.eye(4)).item(), abs=1e-5)
    bunched = torch.eye(4) + 5.0
    assert koleo_loss(bunched) > koleo_loss(torch.eye(4))
    x = torch.randn(8, 5, requires_grad=True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all()


def test_koleo_and_head_bn_train(tmp_path):
    cfg = tiny_cfg(koleo_weight=0.1, head_bn=True)
    model = DINO(cfg)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.teacher_head.modules())
    summary = fit(
        model,
        image_batches(images(), cfg.batch_size, 0),
        train_config(cfg, "cpu"),
        tmp_path / "r",
        {},
        log_path=tmp_path / "curves",
        progress=False,
    )
    rows = read_tsv(tmp_path / "curves")
    assert summary["steps_run"] == cfg.steps and all(math.isfinite(float(r["koleo_loss"])) for r in rows)


def test_mean_patch_features_matches_timm_intermediates():
    torch.manual_seed(0)
    vit = VisionTransformer(
        **vit_kwargs(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3, reg_tokens=1)
    )
    imgs = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    feats = mean_patch_features(vit, imgs, mean, std, layer=-3, batch_size=2)
    x = (imgs.float() / 255 - 0.5) / 0.25
    (ref,) = vit.eval().forward_intermediates(
        x, indices=[1], norm=True, output_fmt="NLC", intermediates_only=True
    )
    assert ref.shape == (5, 16, 48)  # CLS and register tokens dropped
    torch.testing.assert_close(feats, ref.mean(dim=1), rtol=1e-5, atol=1e-5)
    last = mean_patch_features(vit, imgs, mean, std, layer=-1)
    torch.testing.assert_close(last, vit.forward_features(x)[:, 2:].mean(dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer -5 out of range for a ViT with 4 blocks"):
        mean_patch_features(vit, imgs, mean, std, layer=-5)


def test_weighted_knn():
    # Two well-separated directions: every query is classified right.
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    train_labels = torch.arange(40) % 2
    train = centers[train_labels] + 0.1 * torch.randn(40, 3, generator=g)
    val_labels = torch.arange(10) % 2
    val = centers[val_labels] + 0.1 * torch.randn(10, 3, generator=g)
    assert knn_accuracy(train, train_labels, val, val_labels) == 1.0
    assert knn_accuracy(train, train_labels, val, 1 - val_labels) == 0.0
    # Weighting: one very close neighbour of class 1 outvotes two far ones of class 0 at low temperature,
    # while a plain majority (high temperature) picks class 0.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.2]])
    assert knn_predict(bank, labels, query, 2, k=3, temperature=0.07).item() == 1
    assert knn_predict(bank, labels, query, 2, k=3, temperature=1e4).item() == 0
