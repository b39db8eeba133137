"""The pretrain_encoder stage on tiny data: it writes an encoder the tokenizer's registry loads."""

import pytest
import torch

from pipeline.encoders import build_encoder
from pipeline.inspect import inspect_artifact
from pipeline.live import read_curves
from stages import prepare, pretrain_encoder

from .conftest import tiny_params

TINY_SSL = {
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
    params = tiny_params(pretrain_encoder=TINY_SSL)
    prepare.run(params, out=str(root / "images"))
    metrics = pretrain_encoder.run(
        params, images=str(root / "images"), out=str(root / "encoder"), curves=str(root / "curves")
    )
    return root, params, metrics


def test_stage_writes_a_loadable_encoder_and_metrics(pretrained):
    root, params, metrics = pretrained
    keys = ("steps", "final_loss", "images_per_s", "knn_top1_ssl", "knn_top1_random", "knn_gain_points")
    for key in keys + ("change_rate_10db_ssl", "change_rate_10db_random"):
        assert key in metrics
    assert metrics["steps"] == 4 and 0.0 <= metrics["knn_top1_ssl"] <= 1.0
    assert 0.0 <= metrics["change_rate_10db_ssl"] <= 1.0 and 0.0 <= metrics["change_rate_10db_random"] <= 1.0
    assert not (root / "encoder.partial").exists()
    enc = build_encoder("ssl", weights=root / "encoder", layer=-3)
    assert enc.grid == (4, 4) and enc.dim == 32
    feats = enc.patch_features(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert feats.shape == (2, 16, 32) and torch.isfinite(feats).all()
    rows = read_curves(root / "curves")
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and {"loss", "lr"} <= set(rows[0])


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
