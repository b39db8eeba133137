"""The pretrain_encoder stage on tiny data: it writes an encoder the tokenizer's registry loads."""

import json

import pytest
import torch
import yaml

from pipeline.encoders import build_encoder
from pipeline.inspect import inspect_artifact
from pipeline.io import sha256_file
from pipeline.live import read_curves
from stages import prepare, pretrain_encoder

from .conftest import REPO, tiny_params

TINY_SSL = {
    "objective": "vicreg",
    "dense_weight": 1.0,
    "proj_dim": 64,
    "proj_hidden_dim": 64,
    "dense_proj_dim": 32,
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "out_dim": 64,
    "head_hidden_dim": 32,
    "head_bottleneck_dim": 16,
    "patch_out_dim": 64,
    "local_crops": 2,
    "local_crop_size": 16,
    "steps": 4,
    "batch_size": 8,
    "warmup_steps": 1,
    "warmup_teacher_temp_steps": 2,
    "collapse_warmup_steps": 100,
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ssl")
    params = tiny_params(
        pretrain_encoder=TINY_SSL, encoder__source="ssl", kmeans__k=16, evaluate__stability__images=8
    )
    prepare.run(params, out=str(root / "images"))
    metrics = pretrain_encoder.run(
        params, images=str(root / "images"), out=str(root / "encoder"), curves=str(root / "curves")
    )
    return root, params, metrics


def test_stage_writes_a_loadable_encoder_and_metrics(pretrained):
    root, params, metrics = pretrained
    assert metrics["trained"] == 1 and metrics["steps"] == 4 and metrics["kmeans_k"] == 16
    for name in ("knn_top1", "tokens_linear_top1", "tokens_knn_top1", "codes_used"):
        for side in ("ssl", "random"):
            assert 0.0 <= metrics[f"{name}_{side}"] <= (16 if name == "codes_used" else 1.0), name
    # the change rate of both encoders at every SNR of evaluate.stability, not only 10 dB
    snrs = params.evaluate.stability.snrs_db
    assert len(snrs) == 7 and metrics["stability_snrs"] == 7
    for snr in snrs:
        for side in ("ssl", "random"):
            assert 0.0 <= metrics[f"change_rate_{snr:g}db_{side}"] <= 1.0
    assert 0 <= metrics["stability_wins"] <= 7
    assert metrics["knn_gain_points"] == pytest.approx(
        100 * (metrics["knn_top1_ssl"] - metrics["knn_top1_random"])
    )
    assert not (root / "encoder.partial").exists()
    enc = build_encoder("ssl", weights=root / "encoder", layer=-3)
    assert enc.grid == (4, 4) and enc.dim == 32
    feats = enc.patch_features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert feats.shape == (2, 16, 32) and torch.isfinite(feats).all()
    rows = read_curves(root / "curves")
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and {"loss", "lr"} <= set(rows[0])
    assert {"dense_inv", "embedding_rank"} <= set(rows[0])


def test_inspect_encoder_checkpoint(pretrained, tmp_path):
    root, _, _ = pretrained
    text = inspect_artifact(root / "encoder", tmp_path)
    assert text.startswith("[checkpoint]") and "kind: ssl_vit" in text and "parameters:" in text
    assert len(list(tmp_path.glob("*_pca.png"))) == 1


def test_same_params_same_encoder(pretrained, tmp_path):
    root, params, _ = pretrained
    pretrain_encoder.run(params, images=str(root / "images"), out=str(tmp_path / "enc"), curves=None)
    assert (tmp_path / "enc/model.safetensors").read_bytes() == (
        root / "encoder/model.safetensors"
    ).read_bytes()


def test_bad_ssl_params_name_the_key():
    from pipeline.config import ParamsError

    with pytest.raises(ParamsError, match=r"pretrain_encoder: SSLConfig.local_crop_size"):
        tiny_params(pretrain_encoder={**TINY_SSL, "local_crop_size": 12})


def test_source_timm_trains_nothing(tmp_path, monkeypatch):
    # With an encoder from elsewhere the stage neither trains nor reads images: the image dir does not exist
    # and training would fail the test; it writes a marker that the ssl loader refuses with a clear message.
    from pipeline.encoders import EncoderError

    def no_training(*args, **kwargs):
        raise AssertionError("pretrain_encoder trained with encoder.source: timm")

    monkeypatch.setattr(pretrain_encoder, "pretrain_encoder", no_training)
    params = tiny_params(encoder__source="timm", encoder__name="vit_small_patch14_reg4_dinov2.lvd142m")
    out = tmp_path / "encoder"
    metrics = pretrain_encoder.run(params, images=str(tmp_path / "no-images"), out=str(out), curves=None)
    assert metrics == {"trained": 0, "steps": 0, "train_seconds": 0.0}
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    marker = json.loads((out / "config.json").read_text())
    assert marker["kind"] == "unused" and marker["encoder_source"] == "timm" and "'timm'" in marker["reason"]
    with pytest.raises(EncoderError, match="pretrain_encoder trained no encoder here"):
        build_encoder("ssl", weights=out)


def test_published_encoder_is_checked_not_trained(pretrained, tmp_path, monkeypatch):
    # encoder.source file with an encoder directory (the published encoder): no training, the same checks,
    # against the random init of the recipe in its config.json — not of params' pretrain_encoder section.
    root, _, trained = pretrained

    def no_training(*args, **kwargs):
        raise AssertionError("pretrain_encoder trained with a published encoder")

    monkeypatch.setattr(pretrain_encoder, "pretrain_encoder", no_training)
    params = tiny_params(
        encoder__source="file",
        encoder__weights=str(root / "encoder"),
        kmeans__k=16,
        evaluate__stability__images=8,
    )
    out = tmp_path / "encoder"
    curves = tmp_path / "curves"
    metrics = pretrain_encoder.run(params, images=str(root / "images"), out=str(out), curves=str(curves))
    assert metrics["trained"] == 0 and metrics["published"] == 1 and metrics["steps"] == 4
    # dvc.yaml's curve outputs exist: no steps here (this encoder was published without its curves)
    assert (curves / "plots/metrics/loss.tsv").read_text() == "step\tloss\n"
    assert json.loads((curves / "metrics.json").read_text()) == {}
    checks = [
        k for k in trained if k.endswith(("_ssl", "_random", "_gain_points")) or k.startswith("stability_")
    ]
    assert len(checks) > 20 and {k: metrics[k] for k in checks} == {k: trained[k] for k in checks}
    assert json.loads((out / "config.json").read_text())["kind"] == "unused"


def test_file_source_takes_an_encoder_directory(pretrained):
    from pipeline.config import ParamsError

    root, _, _ = pretrained
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    a = build_encoder("ssl", weights=root / "encoder", layer=-3)
    b = build_encoder("file", weights=root / "encoder", layer=-3)
    assert torch.equal(a.patch_features(x), b.patch_features(x))
    assert b.describe()["weights_sha256"] == a.describe()["weights_sha256"] and b.source == "file"
    tiny_params(encoder__source="file", encoder__weights=str(root / "encoder"))  # no name needed
    with pytest.raises(ParamsError, match="needs encoder.name"):
        tiny_params(encoder__source="file", encoder__weights="weights/vit.safetensors")


def test_stage_reads_encoder_source_in_dvc_yaml():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["pretrain_encoder"]
    for key in (
        "encoder.source",
        "encoder.weights",
        "encoder.layer",
        "pretrain_encoder",
        "kmeans.k",
        "evaluate.stability.snrs_db",
    ):
        assert key in stage["params"], key


def test_fresh_images_come_from_the_generator_only_for_builtin_data(tmp_path):
    from pipeline.synthetic import generate_images

    params = tiny_params(
        pretrain_encoder={**TINY_SSL, "fresh_images": True}, base__seed=3, encoder__source="ssl"
    )
    cfg = pretrain_encoder.ssl_config(params)
    batches, source = pretrain_encoder.training_batches(params, cfg, str(tmp_path / "unused"))
    assert source.startswith("fresh built-in train images")
    expected, _ = generate_images(8, 32, 3, 10, "train", start=8)  # step 1 of batch 8
    assert torch.equal(next(batches(1))["image"], torch.from_numpy(expected).permute(0, 3, 1, 2))
    # an ImageFolder has no generator: the train shards are streamed
    folder = tiny_params(
        pretrain_encoder={**TINY_SSL, "fresh_images": True},
        prepare__source="imagefolder",
        prepare__root=str(tmp_path),
    )
    prepare.run(tiny_params(), out=str(tmp_path / "images"))
    _, source = pretrain_encoder.training_batches(folder, cfg, str(tmp_path / "images"))
    assert source == "24 train images (1.3 epochs)"


def _publish_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("publish_encoder", REPO / "scripts" / "publish_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_copies_the_encoder_and_writes_its_card(pretrained, tmp_path):
    root, _, metrics = pretrained
    publish = _publish_script()
    (tmp_path / "m.json").write_text(json.dumps(metrics))
    out = tmp_path / "published"
    args = ["--encoder", str(root / "encoder"), "--metrics", str(tmp_path / "m.json")]
    args += ["--params", str(REPO / "params.yaml"), "--out", str(out), "--curves", str(root / "curves")]
    assert publish.main(args) == 0
    # its training curves go with it, and pretrain_encoder shows them when it checks the published encoder
    assert (out / "curves/plots/metrics/loss.tsv").read_text() == (
        root / "curves/plots/metrics/loss.tsv"
    ).read_text()
    shown = tmp_path / "shown"
    pretrain_encoder.write_untrained_curves(str(shown), out / "curves")
    assert (shown / "plots/metrics/loss.tsv").read_text().count("\n") == 5  # header + 4 steps
    weights = (out / "model.safetensors").read_bytes()
    assert weights == (root / "encoder/model.safetensors").read_bytes()
    card = (out / "MODEL_CARD.md").read_text()
    assert sha256_file(out / "model.safetensors") in card and "4 steps of vicreg" in card
    assert f"| {metrics['knn_top1_ssl']:.3f} | {metrics['knn_top1_random']:.3f}" in card
    assert publish.main(["--encoder", str(root / "encoder"), "--out", str(out), "--check"]) == 0
    # the metrics of another run are refused, and the published copy stays as it was
    (tmp_path / "other.json").write_text(json.dumps(metrics | {"steps": 5}))
    with pytest.raises(SystemExit, match="not the metrics of this training run"):
        publish.main([*args[:2], "--metrics", str(tmp_path / "other.json"), "--out", str(out)])
    assert (out / "model.safetensors").read_bytes() == weights


def test_the_published_encoder_is_the_default_and_matches_its_card():
    from pipeline.config import load_params
    from pipeline.ssl.config import SSLConfig

    pub = REPO / "published" / "encoder"
    card = (pub / "MODEL_CARD.md").read_text()
    for name in ("model.safetensors", "config.json"):
        assert sha256_file(pub / name) in card, name
    params = load_params(REPO / "params.yaml")
    assert (params.encoder.source, params.encoder.weights) == ("file", "published/encoder")
    # params.yaml's pretrain_encoder section is the recipe that reproduces it (encoder.source: ssl)
    recipe = json.loads((pub / "config.json").read_text())["ssl_config"]
    assert SSLConfig.from_dict(recipe) == pretrain_encoder.ssl_config(params)
    enc = build_encoder("file", weights=pub, layer=params.encoder.layer)
    assert enc.grid == (8, 8) and enc.describe()["random_weights"] is False
