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
    build_ssl_model,
    build_vit,
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


# --- joint-embedding objectives (VICReg, SimCLR) and the dense term --------------------------------------

JOINT = dict(TINY, proj_dim=64, proj_hidden_dim=64, dense_proj_dim=32, head_bn=True, depth=3)


def joint_cfg(**over) -> SSLConfig:
    return SSLConfig(**{**JOINT, **over})


def shapes(n: int = 8, size: int = 32) -> np.ndarray:
    from pipeline.synthetic import generate_images

    return generate_images(n, size, seed=0, num_classes=4)[0]


@pytest.mark.parametrize(
    "over",
    [
        # DINO's cross-entropy rises early on while the teacher sharpens (its KL to the student falls); with
        # the teacher and centre frozen the target is fixed, so the loss itself must fall
        {"objective": "dino", "momentum_start": 1.0, "center_momentum": 1.0},
        {"objective": "dino", "momentum_start": 1.0, "center_momentum": 1.0, "ibot_weight": 1.0},
        {"objective": "vicreg"},
        {"objective": "vicreg", "dense_weight": 1.0, "rotate": 30.0},
        {"objective": "simclr"},
        {"objective": "simclr", "dense_weight": 0.5},
    ],
    ids=["dino", "ibot", "vicreg", "vicreg-dense", "simclr", "simclr-dense"],
)
def test_each_objective_is_finite_and_falls_on_a_tiny_run(tmp_path, over):
    # One fixed batch of 8 shapes, 30 steps: the loss of the last steps is below that of the first ones.
    cfg = (tiny_cfg if over["objective"] == "dino" else joint_cfg)(
        **over, steps=30, batch_size=8, warmup_steps=3, lr=2e-3, local_crops=1, collapse_warmup_steps=100
    )
    model = build_ssl_model(cfg)
    fit(
        model,
        image_batches(shapes(8), cfg.batch_size, cfg.seed),
        train_config(cfg, device="cpu"),
        tmp_path / "run",
        {},
        log_path=tmp_path / "log.tsv",
        progress=False,
    )
    losses = [float(r["loss"]) for r in read_tsv(tmp_path / "log.tsv")]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first, (first, last)


def test_vicreg_and_nt_xent_terms():
    from pipeline.ssl.joint import covariance_loss, effective_rank, nt_xent, variance_loss

    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(512, 8, generator=g)
    assert variance_loss(z).item() == 0.0  # every dimension has std > 1
    assert variance_loss(0.5 * torch.ones(16, 4)).item() == pytest.approx(1 - 1e-2, abs=1e-3)
    corr = torch.randn(512, 1, generator=g).expand(512, 2)  # two identical dimensions: covariance = variance
    assert covariance_loss(corr).item() == pytest.approx(2 * corr[:, 0].var().item() ** 2 / 2, rel=1e-4)
    assert effective_rank(torch.ones(10, 5)) == 0.0
    assert effective_rank(torch.randn(10, 1, generator=g) * torch.ones(1, 5)) == pytest.approx(1.0, abs=1e-4)
    assert 7 < effective_rank(torch.randn(1000, 8, generator=g)) <= 8
    # NT-Xent: views that equal their image's other view (and differ from other images) score low loss and
    # perfect retrieval; shuffling the second view's rows breaks the pairing.
    a = torch.nn.functional.one_hot(torch.arange(6), 6).float()
    good, acc = nt_xent(torch.cat([a, a]), 2, 0.1)
    bad, bad_acc = nt_xent(torch.cat([a, a[torch.tensor([1, 2, 3, 4, 5, 0])]]), 2, 0.1)
    assert acc == 1.0 and bad_acc == 0.0 and good < 0.01 < bad
    three, acc3 = nt_xent(torch.cat([a, a, a]), 3, 0.1)
    assert acc3 == 1.0 and three.item() == pytest.approx(math.log(2), abs=1e-3)  # two equal positives


def test_resume_after_a_kill_equals_an_uninterrupted_run_joint(tmp_path):
    cfg = joint_cfg(objective="vicreg", dense_weight=1.0, rotate=20.0, steps=4, local_crops=1)
    train = train_config(cfg, device="cpu", checkpoint_every=2)
    meta = {"kind": "ssl_pretrain", "config": cfg.to_dict()}
    data = shapes(6)
    ref = build_ssl_model(cfg)
    fit(ref, image_batches(data, cfg.batch_size, cfg.seed), train, tmp_path / "ref", meta, progress=False)

    def killed_at_3(start):
        for step, batch in zip(itertools.count(start), image_batches(data, cfg.batch_size, cfg.seed)(start)):
            if step == 3:
                raise KeyboardInterrupt("killed")
            yield batch

    with pytest.raises(KeyboardInterrupt):
        fit(build_ssl_model(cfg), killed_at_3, train, tmp_path / "run", meta, progress=False)
    resumed = build_ssl_model(cfg)
    summary = fit(
        resumed, image_batches(data, cfg.batch_size, cfg.seed), train, tmp_path / "run", meta, progress=False
    )
    assert summary["start_step"] == 2 and int(resumed.step) == 4
    # exact on CPU: views are a function of (seed, step, rank), the step and BatchNorm statistics are state
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("objective", ["vicreg", "simclr"])
def test_collapse_detection_constant_features_joint(objective):
    # Zero the final norm's gain: every image and every patch gets the same features (the norm's bias).
    cfg = joint_cfg(objective=objective, dense_weight=1.0, collapse_warmup_steps=1, collapse_patience=3)
    model = build_ssl_model(cfg)
    with torch.no_grad():
        model.backbone.norm.weight.zero_()
    batch = {"image": torch.from_numpy(shapes(8)).permute(0, 3, 1, 2)}
    with pytest.raises(
        TrainingStopped, match=r"collapsed: feature_std=0\.0000 .*patch_std=0\.0000.*at step 3\b"
    ):
        for step in range(10):
            model.training_loss(batch)
            model.after_optimizer_step(step)
    assert step == 3


def test_collapse_detection_invariance_only_vicreg(tmp_path):
    # VICReg without its variance and covariance terms has a trivial solution — a constant projection —
    # and finds it: the check stops the run and says which indicator went.
    cfg = joint_cfg(
        objective="vicreg",
        var_weight=0.0,
        cov_weight=0.0,
        head_bn=False,
        lr=5e-3,
        steps=200,
        warmup_steps=1,
        collapse_warmup_steps=5,
        collapse_patience=3,
    )
    with pytest.raises(TrainingStopped, match=r"vicreg\) collapsed: .*embedding_(std|rank)="):
        fit(
            build_ssl_model(cfg),
            image_batches(shapes(16), cfg.batch_size, cfg.seed),
            train_config(cfg, device="cpu"),
            tmp_path / "run",
            {},
            progress=False,
        )


def test_healthy_joint_start_does_not_trip_the_collapse_checks(tmp_path):
    cfg = joint_cfg(objective="vicreg", dense_weight=1.0, collapse_warmup_steps=0, collapse_patience=1)
    summary = fit(
        build_ssl_model(cfg),
        image_batches(shapes(12), cfg.batch_size, cfg.seed),
        train_config(cfg, device="cpu"),
        tmp_path / "run",
        {},
        log_path=tmp_path / "log.tsv",
        progress=False,
    )
    assert summary["steps_run"] == cfg.steps
    rows = read_tsv(tmp_path / "log.tsv")
    for key in (
        "inv_loss",
        "var_loss",
        "cov_loss",
        "dense_inv",
        "embedding_rank",
        "patch_std",
        "matched_share",
    ):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert all(0 < float(r["matched_share"]) <= 1 for r in rows)


def _box(w: float, h: float, cx: float, cy: float, flip: bool = False, degrees: float = 0.0) -> torch.Tensor:
    a = math.radians(degrees)
    f = -1.0 if flip else 1.0
    return torch.tensor(
        [[math.cos(a) * w * f, -math.sin(a) * h, cx], [math.sin(a) * w * f, math.cos(a) * h, cy]]
    ).unsqueeze(0)


def test_dense_matching_on_constructed_crops():
    from pipeline.ssl.joint import match_views, patch_centres, sample_patch_grid

    g = 4
    full = _box(1, 1, 0, 0)
    quadrant = _box(0.5, 0.5, 0.5, 0.5)  # the bottom-right quarter of the image
    # view a = the whole image: only its bottom-right 2x2 patches lie in the quadrant view
    coords, valid = match_views(full, g, quadrant, g)
    assert valid[0].nonzero().flatten().tolist() == [10, 11, 14, 15]
    # patch (row 2, col 2) of the full view is centred at image (0.25, 0.25): the quadrant's (-0.5, -0.5),
    # halfway between its patches (0, 0), (0, 1), (1, 0), (1, 1)
    torch.testing.assert_close(coords[0, 10], torch.tensor([-0.5, -0.5]))
    tokens = torch.arange(16.0).view(1, 16, 1)
    assert sample_patch_grid(tokens, g, coords[:, 10:11])[0, 0, 0].item() == pytest.approx(
        (0 + 1 + 4 + 5) / 4
    )
    # every patch of the quadrant view lies in the full view, on the full view's image coordinates
    back, valid_b = match_views(quadrant, g, full, g)
    assert valid_b.all()
    torch.testing.assert_close(back[0], 0.5 * patch_centres(g) + 0.5)

    # A token map that stores each patch's own image coordinates: sampling it where a patch of the other
    # view lands returns that patch's image coordinates, for flips, rotations and scale changes alike.
    def image_coords(theta: torch.Tensor, grid: int) -> torch.Tensor:
        return patch_centres(grid) @ theta[0, :, :2].T + theta[0, :, 2]

    a = _box(0.6, 0.7, -0.2, 0.1, flip=True, degrees=25)
    b = _box(0.8, 0.5, 0.1, 0.2, degrees=-40)
    for ga, gb in ((4, 4), (4, 2), (2, 4)):
        coords, valid = match_views(a, ga, b, gb)
        sampled = sample_patch_grid(image_coords(b, gb).unsqueeze(0), gb, coords)
        expected = image_coords(a, ga)
        inside = (coords.abs() <= 1 - 1 / gb).all(dim=-1)[0]  # between b's outer patch centres: exact
        assert inside.any()
        torch.testing.assert_close(sampled[0][inside], expected[inside], rtol=0, atol=1e-5)
        assert valid[0][inside].all()

    # A horizontal flip of the whole image: patch (r, c) of one view is patch (r, g-1-c) of the other.
    coords, valid = match_views(full, g, _box(1, 1, 0, 0, flip=True), g)
    perm = sample_patch_grid(tokens, g, coords)[0, :, 0].long()
    assert valid.all() and perm.tolist() == [4 * r + (3 - c) for r in range(4) for c in range(4)]


def test_crop_matrices_describe_the_crops():
    # An image whose channels hold each pixel's normalised (x, y): a crop's patch means are the image
    # coordinates of the patch centres, which is what match_views computes from the crop matrices.
    from pipeline.ssl.augment import apply_crop, crop_thetas
    from pipeline.ssl.joint import patch_centres

    size, out, p = 64, 32, 8
    c = (2 * torch.arange(size) + 1) / size - 1
    y, x = torch.meshgrid(c, c, indexing="ij")
    img = torch.stack([x, y, torch.zeros_like(x)]).unsqueeze(0).expand(6, 3, size, size)
    theta = crop_thetas(6, (0.15, 0.35), 0.5, torch.Generator().manual_seed(3), rotate=30.0)
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()  # some crops flipped, some not
    crops = apply_crop(img, theta, out)
    means = torch.nn.functional.avg_pool2d(crops[:, :2], p).flatten(2).transpose(1, 2)  # [6, 16, 2]
    centres = patch_centres(out // p)
    predicted = centres @ theta[:, :, :2].transpose(1, 2) + theta[:, None, :, 2]
    torch.testing.assert_close(means, predicted, rtol=0, atol=1e-4)


def test_generator_and_shard_streams(tmp_path):
    from pipeline.shards import write_shard
    from pipeline.ssl import generator_batches, shard_batches
    from pipeline.synthetic import generate_images

    a = generator_batches(32, 5, 4, batch_size=6, prefetch=True)
    b = generator_batches(32, 5, 4, batch_size=6, prefetch=False)
    first = list(itertools.islice(a(0), 3))
    resumed = next(b(2))["image"]
    assert torch.equal(resumed, first[2]["image"])
    # step s is train images s*B .. s*B+B-1 of the generator: always new images, never the val split
    expected, _ = generate_images(6, 32, 5, 4, "train", start=12)
    assert torch.equal(first[2]["image"], torch.from_numpy(expected).permute(0, 3, 1, 2))

    imgs = images(10, 8)
    for i in range(2):
        write_shard(
            tmp_path / f"train-{i:05d}.tar",
            [(f"k{j}", {"png": imgs[j], "cls": 0}) for j in range(5 * i, 5 * i + 5)],
        )
    stream = shard_batches(sorted(tmp_path.glob("train-*.tar")), 5, seed=1)
    epoch = torch.cat([s["image"] for s in itertools.islice(stream(0), 2)])
    assert epoch.shape == (10, 3, 8, 8) and epoch.dtype == torch.uint8
    assert {bytes(t.permute(1, 2, 0).numpy().tobytes()) for t in epoch} == {bytes(i.tobytes()) for i in imgs}
    assert torch.equal(next(stream(1))["image"], epoch[5:])


def test_joint_config_checks():
    with pytest.raises(ValueError, match="objective: expected one of"):
        joint_cfg(objective="byol")
    with pytest.raises(ValueError, match="ibot_weight: 1.0 is a DINO term"):
        joint_cfg(objective="vicreg", ibot_weight=1.0)
    with pytest.raises(ValueError, match="dense_weight: the dense term belongs to the joint"):
        tiny_cfg(objective="dino", dense_weight=1.0)
    with pytest.raises(ValueError, match="dense_layer: -4 is out of range for depth 3"):
        joint_cfg(objective="vicreg", dense_weight=1.0, dense_layer=-4)
    with pytest.raises(ValueError, match="global_crop_size: 20 must be a positive multiple of patch_size 8"):
        joint_cfg(objective="vicreg", global_crop_size=20)


def test_joint_export_is_the_trained_backbone(tmp_path):
    cfg = joint_cfg(objective="simclr")
    model = build_ssl_model(cfg)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.5)
    model.step.fill_(3)
    export_encoder(model, tmp_path / "enc")
    vit, meta = load_encoder(tmp_path / "enc")
    assert meta["steps"] == 3 and meta["ssl_config"]["objective"] == "simclr"
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit.forward_features(x), model.backbone.eval().forward_features(x))
    # the random-init reference of the stage is the same seed's untrained backbone
    fresh = build_ssl_model(cfg).export_backbone
    torch.manual_seed(cfg.seed)
    assert torch.equal(
        fresh.state_dict()["pos_embed"], build_vit(cfg.timm_kwargs(), cfg.stem).state_dict()["pos_embed"]
    )


def test_gaussian_noise_augmentation_has_the_requested_snr():
    from pipeline.metrics.stability import measured_snr_db
    from pipeline.ssl.augment import gaussian_noise

    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 32, 32, generator=g)
    assert torch.equal(gaussian_noise(x, 0.0, (5.0, 5.0), g), x)  # p = 0: untouched
    noisy = gaussian_noise(x, 1.0, (10.0, 10.0), g)
    snr = measured_snr_db(2 * x - 1, 2 * noisy - 1)  # measured where the stability metric measures it
    assert snr.mean().item() == pytest.approx(10.0, abs=0.1) and snr.std() < 0.2
    half = gaussian_noise(x, 0.5, (10.0, 20.0), g)
    changed = (half != x).flatten(1).any(dim=1)
    assert 16 < int(changed.sum()) < 48
