"""taming/MAGE VQGAN: released key names, safe checkpoint reading, strict loading, tokenizer API."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pipeline.models.taming import (
    AttnBlock,
    TamingConfig,
    TamingVQGAN,
    infer_config,
    load_taming_vqgan,
    read_state_dict,
)

# Small but structurally complete: two levels, attention at 8x8 (the lower level), a channel change.
SMALL = dict(
    ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=8, embed_dim=8
)
SMALL_YAML = {
    "model": {
        "target": "taming.models.vqgan.VQModel",
        "params": {
            "embed_dim": 8,
            "n_embed": 16,
            "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"},
            "ddconfig": {
                "double_z": False,
                "z_channels": 8,
                "resolution": 16,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 32,
                "ch_mult": [1, 2],
                "num_res_blocks": 1,
                "attn_resolutions": [8],
                "dropout": 0.0,
            },
        },
    }
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def random_vqgan(layout: str = "taming", seed: int = 0) -> TamingVQGAN:
    torch.manual_seed(seed)
    vq = TamingVQGAN(TamingConfig(**SMALL, n_embed=16, layout=layout)).eval()
    with torch.no_grad():
        # Spread the codebook so that random latents use many codes (taming inits it to +-1/n).
        vq.model.quantize.embedding.weight.normal_()
    return vq


def images(n: int = 2, size: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


class FakeCallback:  # stands for pytorch_lightning's ModelCheckpoint, which is not installed here
    def __init__(self, monitor: str):
        self.monitor = monitor


SIDE_EFFECTS: list[str] = []


def _side_effect(*args):
    SIDE_EFFECTS.append("ran")
    return "pwned"


class Booby:
    """Unpickling this with a full unpickler would call _side_effect."""

    def __reduce__(self):
        return (_side_effect, ("payload",))


def test_released_f16_key_names_and_shapes():
    # The ImageNet f16-1024 config; names and shapes as in taming's Encoder/Decoder/VQModel.
    with torch.device("meta"):
        vq = TamingVQGAN(TamingConfig())
    sd = vq.model.state_dict()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.3.downsample.conv.weight": (256, 256, 3, 3),
        "encoder.down.4.attn.1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (256, 512, 3, 3),
        "quant_conv.weight": (256, 256, 1, 1),
        "quantize.embedding.weight": (1024, 256),
        "post_quant_conv.weight": (256, 256, 1, 1),
        "decoder.conv_in.weight": (512, 256, 3, 3),
        "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # Attention only at 16x16 (level 4), 2 blocks in the encoder and 3 in the decoder per level.
    assert not any(".attn." in k for k in sd if k.startswith(("encoder.down.3", "decoder.up.3")))
    assert "decoder.up.0.block.3.conv1.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd
    assert infer_config(sd) == TamingConfig()
    assert vq.downsample == 16 and vq.token_shape(256, 256) == (16, 16)


def test_attention_matches_taming_bmm_formulation():
    torch.manual_seed(0)
    block = AttnBlock(32).eval()
    x = torch.randn(2, 32, 4, 5)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = block.q(h), block.k(h), block.v(h)
        b, c, hh, ww = q.shape
        w_ = torch.bmm(q.reshape(b, c, hh * ww).permute(0, 2, 1), k.reshape(b, c, hh * ww)) * c**-0.5
        w_ = F.softmax(w_, dim=2).permute(0, 2, 1)
        ref = x + block.proj_out(torch.bmm(v.reshape(b, c, hh * ww), w_).reshape(b, c, hh, ww))
        assert torch.allclose(block(x), ref, atol=1e-5)


@pytest.mark.parametrize("layout", ["taming", "mage"])
def test_ckpt_and_safetensors_load_to_identical_outputs(tmp_path, layout):
    vq = random_vqgan(layout)
    x = images()
    ids = vq.encode(x)
    rec = vq.decode(ids)
    assert ids.shape == (2, 8, 8) and ids.dtype == torch.long and len(ids.unique()) > 4
    assert rec.shape == x.shape and float(rec.abs().max()) <= 1.0
    flat_ids, latents = vq.tokens_and_latents(x)
    assert torch.equal(flat_ids, ids.flatten(1)) and latents.shape == (2, 64, 8)

    state = vq.model.state_dict()
    lightning = {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": {
            **state,
            "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
            "loss.logvar": torch.zeros(()),
        },
        "callbacks": {FakeCallback: {"best_model_score": torch.tensor(0.5)}},
        "hyper_parameters": {"monitor": FakeCallback("val/rec_loss"), "booby": Booby()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6}]}],
    }
    torch.save(lightning, tmp_path / "last.ckpt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "vq.safetensors"))

    loaded = [
        load_taming_vqgan(tmp_path / "last.ckpt"),  # config inferred from the keys
        load_taming_vqgan(tmp_path / "vq.safetensors", SMALL_YAML),  # taming's YAML, layout from the keys
        load_taming_vqgan(tmp_path / "vq.safetensors", {**SMALL, "n_embed": 16, "layout": layout}),
    ]
    assert SIDE_EFFECTS == [], "a checkpoint's pickled callable must never run"
    for other in loaded:
        assert other.cfg.layout == layout and not other.training
        assert torch.equal(other.encode(x), ids)
        assert torch.equal(other.decode(ids), rec)
        for k, v in state.items():
            assert torch.equal(other.model.state_dict()[k], v), k


def test_mage_layout_differences_and_pixel_range():
    vq = random_vqgan("mage")
    sd = vq.model.state_dict()
    assert not any("attn" in k for k in sd) and "quant_conv.weight" not in sd
    assert "encoder.down.0.downsample.conv.weight" not in sd  # average pooling
    assert "decoder.up.1.upsample.conv.weight" in sd
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (64, 64, 1, 1)  # applied to h (out->out)
    assert "encoder.down.1.block.0.conv1.bias" not in sd and "encoder.conv_in.bias" not in sd
    assert sd["encoder.conv_out.weight"].shape[-1] == 1
    assert "decoder.up.0.block.1.conv1.weight" not in sd  # num_res_blocks, not num_res_blocks + 1
    # MAGE's networks see pixels in [0, 1]; the wrapper maps our [-1, 1] in and out.
    x = images()
    z = vq.model.encoder((x + 1) / 2)
    assert torch.equal(vq.encode(x), vq.model.quantize.indices(z))
    ids = vq.encode(x)
    raw = vq.model.decoder(vq.model.quantize.lookup(ids))
    assert torch.allclose(vq.decode(ids), (raw * 2 - 1).clamp(-1, 1))
    with pytest.raises(ValueError, match="z_channels"):
        TamingConfig(**{**SMALL, "embed_dim": 4}, layout="mage")


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = random_vqgan().model.state_dict()
    broken = {k: v for k, v in state.items() if k != "decoder.mid.attn_1.q.bias"}
    broken["decoder.extra.weight"] = torch.zeros(1)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['decoder.mid.attn_1.q.bias'\]") as err:
        load_taming_vqgan(tmp_path / "broken.safetensors", {**SMALL, "n_embed": 16})
    assert "unexpected keys (1): ['decoder.extra.weight']" in str(err.value)

    wrong = dict(state)
    wrong["quantize.embedding.weight"] = torch.zeros(32, 8)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match=r"quantize.embedding.weight: \(32, 8\) vs \(16, 8\)"):
        load_taming_vqgan(tmp_path / "wrong.safetensors", {**SMALL, "n_embed": 16})


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        read_state_dict(tmp_path / "nope.ckpt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a dict"):
        read_state_dict(tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"unknown keys \['chanels'\]"):
        TamingConfig.from_dict({"chanels": 3})
    with pytest.raises(ValueError, match="remap"):
        TamingConfig.from_dict({"n_embed": 16, "remap": "used.npy"})
    vq = random_vqgan()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 16\)"):
        vq.decode(torch.full((1, 8, 8), 16))
    with pytest.raises(ValueError, match="not divisible by the downsample factor 2"):
        vq.encode(torch.zeros(1, 3, 15, 16))
    # Config round trip: the dataclass accepts its own asdict (e.g. stored next to an exported checkpoint).
    assert TamingConfig.from_dict(dataclasses.asdict(vq.cfg)) == vq.cfg
