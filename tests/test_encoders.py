import json

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from pipeline.checkpoint import save_checkpoint
from pipeline.encoders import EncoderError, RandomWeightsWarning, build_encoder

ARCH = "vit_small_patch14_reg4_dinov2"
# A 4-block DINOv2-style ViT (CLS + 4 registers, LayerScale) small enough to run in milliseconds.
# LayerScale 0.5 instead of DINOv2's 1e-5 so that consecutive blocks give clearly different outputs.
TINY = {"depth": 4, "embed_dim": 48, "num_heads": 2, "init_values": 0.5}


def tiny_random(img_size: int = 28, layer: int = -3, seed: int = 0, **kw):
    with pytest.warns(RandomWeightsWarning, match="RANDOM weights"):
        return build_encoder(
            "random", ARCH, layer=layer, img_size=img_size, seed=seed, model_kwargs=TINY, **kw
        )


def images(n: int = 3, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)


def manual_block_output(enc, imgs: torch.Tensor, block: int) -> torch.Tensor:
    m = enc.model
    with torch.no_grad():
        x = m.norm_pre(m._pos_embed(m.patch_embed(enc.preprocess(imgs))))
        for blk in m.blocks[: block + 1]:
            x = blk(x)
        return m.norm(x)[:, m.num_prefix_tokens :]


def to_meta_dinov2_layout(sd: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """timm reg4 DINOv2 state dict -> the key layout of Meta's dinov2_vit*14_reg4_pretrain.pth."""
    g = torch.Generator().manual_seed(seed)
    dim = sd["cls_token"].shape[-1]
    pos_cls = torch.randn(1, 1, dim, generator=g)  # Meta keeps a position for CLS; timm folds it in.
    out = {k: v.clone() for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    out["cls_token"] = sd["cls_token"] - pos_cls
    out["pos_embed"] = torch.cat([pos_cls, sd["pos_embed"]], dim=1)
    out["register_tokens"] = sd["reg_token"].clone()
    out["mask_token"] = torch.zeros(1, dim)
    return out


def test_random_source_warns_and_is_recorded():
    enc = tiny_random()
    d = enc.describe()
    assert d["source"] == "random" and d["random_weights"] is True and d["weights_sha256"] == ""
    assert (enc.grid, enc.patch_size, enc.dim, enc.num_tokens) == ((2, 2), 14, 48, 4)
    assert (d["layer"], d["block_index"], d["depth"]) == (-3, 1, 4)
    json.dumps(d)  # attributes must be storable as Zarr/JSON attrs


def test_random_source_is_seeded():
    a, b, c = tiny_random(seed=3), tiny_random(seed=3), tiny_random(seed=4)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("layer", [0, 1, -3, -1])
def test_layer_picks_that_block_through_final_norm_without_prefix_tokens(layer):
    enc = tiny_random(layer=layer)
    imgs = images()
    feats = enc.patch_features(imgs)
    assert feats.dtype == torch.float32 and feats.shape == (3, 4, 48)
    expected = manual_block_output(enc, imgs, layer % 4)
    torch.testing.assert_close(feats, expected, rtol=1e-5, atol=1e-5)
    # The neighbouring block is really different, so the comparison above can fail.
    other = manual_block_output(enc, imgs, (layer + 1) % 4)
    assert (feats - other).abs().max() > 1e-2


def test_layer_out_of_range_is_a_clear_error():
    with pytest.raises(EncoderError, match=r"layer: -5 is out of range .* 4 blocks"):
        tiny_random(layer=-5)


def test_preprocess_accepts_uint8_nhwc_float_nchw_and_resizes():
    enc = tiny_random()
    u8 = images()
    f = enc.patch_features(u8)
    torch.testing.assert_close(enc.patch_features(u8.permute(0, 2, 3, 1).numpy()), f)
    torch.testing.assert_close(enc.patch_features(u8.float() / 255.0), f)
    assert enc.patch_features(images(2, size=40)).shape == (2, 4, 48)
    with pytest.raises(EncoderError, match=r"must lie in \[0, 1\]"):
        enc.patch_features(u8.float())


def test_file_source_loads_timm_and_meta_layouts_identically(tmp_path):
    ref = tiny_random()
    sd = ref.model.state_dict()
    meta_sd = to_meta_dinov2_layout(sd)
    assert {"mask_token", "register_tokens", "blocks.0.ls1.gamma"} <= meta_sd.keys()
    assert meta_sd["pos_embed"].shape == (1, 1 + 4, 48) and "reg_token" not in meta_sd

    save_file(sd, tmp_path / "timm.safetensors")
    torch.save(sd, tmp_path / "timm.pth")
    save_file(meta_sd, tmp_path / "meta.safetensors")
    torch.save(meta_sd, tmp_path / "meta.pth")

    imgs = images()
    want = ref.patch_features(imgs)
    for fname in ("timm.safetensors", "timm.pth", "meta.safetensors", "meta.pth"):
        enc = build_encoder("file", ARCH, weights=tmp_path / fname, img_size=28, model_kwargs=TINY)
        torch.testing.assert_close(enc.patch_features(imgs), want, rtol=1e-5, atol=1e-5, msg=fname)
        assert enc.describe()["weights_sha256"] != "" and enc.source == "file"
        assert enc.mean == pytest.approx((0.485, 0.456, 0.406))


def test_file_source_meta_layout_resamples_pos_embed_like_timm_layout(tmp_path):
    # Weights made at a 4x4 grid (as Meta's are at 37x37) served at 2x2.
    big = tiny_random(img_size=56)
    sd = big.model.state_dict()
    save_file(sd, tmp_path / "timm.safetensors")
    save_file(to_meta_dinov2_layout(sd), tmp_path / "meta.safetensors")
    a = build_encoder("file", ARCH, weights=tmp_path / "timm.safetensors", img_size=28, model_kwargs=TINY)
    b = build_encoder("file", ARCH, weights=tmp_path / "meta.safetensors", img_size=28, model_kwargs=TINY)
    want_pos = resample_abs_pos_embed(sd["pos_embed"], new_size=[2, 2], num_prefix_tokens=0)
    assert b.model.pos_embed.shape == (1, 4, 48)
    torch.testing.assert_close(b.model.pos_embed.detach(), want_pos)
    torch.testing.assert_close(a.patch_features(images()), b.patch_features(images()), rtol=1e-5, atol=1e-5)


_unpickled: list[str] = []


def _record(tag: str) -> str:
    _unpickled.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_record, ("payload ran",))


def test_file_source_never_unpickles_arbitrary_objects(tmp_path):
    sd = tiny_random().model.state_dict()
    torch.save({"state_dict": sd, "extra": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(EncoderError, match="could not load .*evil.pth"):
        build_encoder("file", ARCH, weights=tmp_path / "evil.pth", img_size=28, model_kwargs=TINY)
    assert _unpickled == []


def test_file_source_errors_name_the_file(tmp_path):
    with pytest.raises(EncoderError, match="does not exist"):
        build_encoder("file", ARCH, weights=tmp_path / "missing.pth")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(EncoderError, match=r"w.npz should end in one of"):
        build_encoder("file", ARCH, weights=tmp_path / "w.npz")
    wrong = {"pos_embed": torch.zeros(1, 4, 8)}
    save_file(wrong, tmp_path / "wrong.safetensors")
    with pytest.raises(EncoderError, match=r"could not load .*wrong.safetensors into timm model"):
        build_encoder("file", ARCH, weights=tmp_path / "wrong.safetensors", img_size=28, model_kwargs=TINY)


def test_timm_source_offline_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # no stale cache hit
    with pytest.raises(EncoderError) as err:
        build_encoder("timm", f"{ARCH}.lvd142m", img_size=28, model_kwargs=TINY)
    msg = str(err.value)
    assert "could not fetch the pretrained weights" in msg and "Offline?" in msg
    assert "source: file" in msg and "weights: path/to/file" in msg


def test_unknown_source_and_model_name():
    with pytest.raises(EncoderError, match="not one of timm, file, ssl, random"):
        build_encoder("hub", ARCH)
    with pytest.raises(EncoderError, match="'vit_nope' is not a timm model"):
        build_encoder("random", "vit_nope")


# The shape of what pipeline/ssl exports (timm VisionTransformer kwargs), at a tiny size.
SSL_KWARGS = {
    "img_size": 32,
    "patch_size": 8,
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "mlp_ratio": 4.0,
    "reg_tokens": 0,
    "num_classes": 0,
    "global_pool": "token",
    "class_token": True,
    "dynamic_img_size": True,
}


def save_ssl(tmp_path, **meta_overrides):
    torch.manual_seed(0)
    vit = VisionTransformer(**SSL_KWARGS)
    meta = {
        "kind": "ssl_vit",
        "timm_kwargs": SSL_KWARGS,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "img_size": 32,
        "patch_size": 8,
        "steps": 10,
    }
    meta.update(meta_overrides)
    return vit, save_checkpoint(tmp_path / "encoder", vit.state_dict(), meta)


def test_ssl_source_rebuilds_the_exported_vit(tmp_path):
    vit, d = save_ssl(tmp_path)
    enc = build_encoder("ssl", weights=d, layer=-1)
    assert (enc.img_size, enc.grid, enc.dim, enc.mean, enc.std) == (32, (4, 4), 32, (0.5,) * 3, (0.25,) * 3)
    imgs = images(2, size=32)
    x = (imgs.float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        want = vit.eval().forward_features(x)[:, 1:]  # last block + final norm, CLS dropped
    torch.testing.assert_close(enc.patch_features(imgs), want, rtol=1e-5, atol=1e-5)
    desc = enc.describe()
    assert desc["source"] == "ssl" and len(desc["weights_sha256"]) == 64 and desc["random_weights"] is False

    # Served at 48 px: positions resampled once at load equal timm's on-the-fly resampling.
    bigger = build_encoder("ssl", weights=d, img_size=48, layer=-1)
    imgs48 = images(2, size=48)
    with torch.no_grad():
        want48 = vit.forward_features((imgs48.float() / 255 - 0.5) / 0.25)[:, 1:]
    assert bigger.grid == (6, 6)
    torch.testing.assert_close(bigger.patch_features(imgs48), want48, rtol=1e-5, atol=1e-5)


def test_ssl_source_checks_its_config(tmp_path):
    _, d = save_ssl(tmp_path, kind="vq")
    with pytest.raises(EncoderError, match=r"config.json: kind is 'vq', expected 'ssl_vit'"):
        build_encoder("ssl", weights=d)
    _, d = save_ssl(tmp_path, timm_kwargs={**SSL_KWARGS, "depth": 2})
    with pytest.raises(EncoderError, match="does not match timm_kwargs"):
        build_encoder("ssl", weights=d)
    with pytest.raises(EncoderError, match="missing"):
        build_encoder("ssl", weights=tmp_path / "nowhere")


def test_numpy_batch_is_accepted():
    enc = tiny_random()
    arr = np.zeros((2, 28, 28, 3), dtype=np.uint8)
    assert enc.patch_features(arr).shape == (2, 4, 48)
