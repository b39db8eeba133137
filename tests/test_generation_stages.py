"""train_gpt (both variants) → train_renderer → sample (both variants), end to end on tiny tokens made by
the real tokenizer stages (prepare → extract → kmeans → train_vq → tokenize)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import pipeline.train
from pipeline.config import dump_params, with_overrides
from pipeline.io import read_json
from pipeline.live import read_curves
from pipeline.models.gpt import load_gpt
from pipeline.models.renderer import load_renderer
from pipeline.pixel_vq import load_pixel_vq, to_uint8
from pipeline.shards import iter_samples, list_shards
from stages import extract, kmeans, prepare, sample, tokenize, train_gpt, train_renderer, train_vq

from .conftest import REPO, chain_params

TINY_MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "ffn_dim": 64}
N_SAMPLES, PER_SHARD, CLASSES = 20, 8, 10


def _params(encoder_dir, **kw):
    # several shards from 20 samples
    return chain_params(encoder_dir, TINY_MODEL, N_SAMPLES, sample__shard_size=PER_SHARD, **kw)


def _sample(params, root, variant, out, **paths):
    return sample.run(
        params,
        variant=variant,
        gpt=str(root / f"gpt_{variant}"),
        renderer=str(root / "renderer"),
        vq=str(root / "vq"),
        tokens=str(root / "tokens"),
        out=str(out),
        **paths,
    )


def _tokens(params, root, out):
    """extract → kmeans → tokenize of root's images and VQ, into out (features.zarr, kmeans, tokens)."""
    extract.run(params, images=str(root / "images"), out=str(out / "features.zarr"))
    kmeans.run(params, features=str(out / "features.zarr"), out=str(out / "kmeans"))
    tokenize.run(
        params,
        kmeans=str(out / "kmeans"),
        images=str(root / "images"),
        vq=str(root / "vq"),
        out=str(out / "tokens"),
    )


@pytest.fixture(scope="module")
def chain(one_thread, encoder_dir, tmp_path_factory):
    """The tiny token shards, both GPTs (digit: class-conditional, vq: unconditional), the renderer and
    samples of both variants."""
    root = tmp_path_factory.mktemp("gen")
    params = _params(encoder_dir)
    prepare.run(params, out=str(root / "images"))
    train_vq.run(params, images=str(root / "images"), out=str(root / "vq"), curves=None)
    _tokens(params, root, root)
    m = {}
    m["gpt_digit"] = train_gpt.run(
        params, "digit", str(root / "tokens"), str(root / "gpt_{variant}"), str(root / "gpt_digit_curves")
    )
    uncond = _params(encoder_dir, train_gpt__model={**TINY_MODEL, "class_conditional": False})
    m["gpt_vq"] = train_gpt.run(
        uncond, "vq", str(root / "tokens"), str(root / "gpt_vq"), str(root / "gpt_vq_curves")
    )
    m["renderer"] = train_renderer.run(
        params, str(root / "tokens"), str(root / "renderer"), str(root / "renderer_curves")
    )
    m["sample_digit"] = _sample(
        params, root, "digit", root / "samples_digit", grid=str(root / "grid_digit.png")
    )
    m["sample_vq"] = _sample(params, root, "vq", root / "samples_vq", grid=str(root / "grid_vq.png"))
    return root, params, m


def _weights(directory):
    return load_file(str(directory / "model.safetensors"))


# --- train_gpt ---------------------------------------------------------------------------------------


def test_train_gpt_outputs_follow_the_contract(chain):
    root, _, m = chain
    assert sorted(p.name for p in root.glob("gpt_digit*")) == ["gpt_digit", "gpt_digit_curves"]  # no .partial
    assert sorted(p.name for p in (root / "gpt_digit").iterdir()) == ["config.json", "model.safetensors"]
    saved = read_json(root / "gpt_digit/config.json")
    assert saved["variant"] == "digit" and saved["tokens_field"] == "digit.npy" and saved["step"] == 6
    digit, vq = load_gpt(root / "gpt_digit"), load_gpt(root / "gpt_vq")
    # DiGIT tokens: K=8 on a 4×4 grid, class-conditional over 10 classes; VQ tokens: V=16 on 4×4
    assert (digit.config.vocab_size, digit.config.block_size, digit.config.num_classes) == (8, 16, CLASSES)
    assert (vq.config.vocab_size, vq.config.block_size, vq.config.num_classes) == (16, 16, 0)
    assert (digit.config.n_layer, digit.config.n_embd) == (1, 32)
    for variant, model in (("digit", digit), ("vq", vq)):
        metrics = m[f"gpt_{variant}"]
        assert metrics["params"] == model.num_params()
        assert metrics["steps"] == 6 and metrics["resumed_from_step"] == 0
        assert metrics["val_sequences"] == 12 and 0.0 <= metrics["val_acc"] <= 1.0
        assert metrics["tokens_per_s"] == pytest.approx(16 * metrics["sequences_per_s"])
        for key in ("final_loss", "val_loss", "val_nll", "train_seconds", "seconds"):
            assert math.isfinite(metrics[key]) and metrics[key] > 0, key
        rows = read_curves(root / f"gpt_{variant}_curves")
        assert [int(r["step"]) for r in rows] == list(range(6)) and "acc" in rows[0]
        assert float(rows[-1]["loss"]) == pytest.approx(metrics["final_loss"], rel=1e-5)


def test_train_gpt_val_metrics_are_teacher_forced_nll_with_true_labels(chain):
    root, _, m = chain
    model = load_gpt(root / "gpt_digit").eval()
    samples = list(iter_samples(list_shards(root / "tokens", "val")))
    tokens = torch.from_numpy(np.stack([s["digit.npy"] for s in samples]).astype(np.int64)).view(12, 16)
    labels = torch.tensor([s["cls"] for s in samples])
    with torch.no_grad():
        hidden = model.forward_features(tokens, labels)[-1]
        logits = model.head(model.trunk.ln_f(hidden))[:, :16]  # position j predicts token j
    nll = F.cross_entropy(logits.reshape(-1, 8), tokens.reshape(-1))
    assert m["gpt_digit"]["val_nll"] == pytest.approx(float(nll), rel=1e-4)
    acc = (logits.argmax(-1) == tokens).float().mean()
    assert m["gpt_digit"]["val_acc"] == pytest.approx(float(acc), abs=1e-6)


def test_train_gpt_resumes_after_a_kill_to_the_same_weights(chain, tmp_path, monkeypatch):
    root, params, m = chain
    params = with_overrides(params, {"train_gpt.train.checkpoint_every": 2})
    real = pipeline.train.save_checkpoint

    def dies_after_first_checkpoint(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(pipeline.train, "save_checkpoint", dies_after_first_checkpoint)
    out, curves = tmp_path / "gpt", tmp_path / "gpt_curves"
    with pytest.raises(KeyboardInterrupt):
        train_gpt.run(params, "digit", str(root / "tokens"), str(out), str(curves))
    assert not out.exists(), "a killed run must not leave finished-looking weights"
    assert read_json(tmp_path / "gpt.partial/last/config.json")["step"] == 2
    monkeypatch.setattr(pipeline.train, "save_checkpoint", real)
    resumed = train_gpt.run(params, "digit", str(root / "tokens"), str(out), str(curves))
    assert resumed["resumed_from_step"] == 2 and not (tmp_path / "gpt.partial").exists()
    a, b = _weights(out), _weights(root / "gpt_digit")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in read_curves(curves)] == [
        r["loss"] for r in read_curves(root / "gpt_digit_curves")
    ]
    assert resumed["val_nll"] == m["gpt_digit"]["val_nll"]


def test_bad_variant_is_a_clear_error(chain, tmp_path):
    root, params, _ = chain
    with pytest.raises(ValueError, match=r"variant 'pixels': expected one of \['digit', 'vq'\]"):
        train_gpt.run(params, "pixels", str(root / "tokens"), str(tmp_path / "gpt"), None)
    with pytest.raises(ValueError, match=r"variant 'pixels': expected one of \['digit', 'vq'\]"):
        sample.run(params, variant="pixels", tokens=str(root / "tokens"), out=str(tmp_path / "s"))
    assert not any(tmp_path.iterdir())


def test_train_gpt_cli_fills_the_variant_into_default_paths(chain, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        train_gpt.main(["--help"])
    assert e.value.code == 0 and "--variant" in capsys.readouterr().out
    root, params, _ = chain
    dump_params(with_overrides(params, {"train_gpt.train.steps": 2}), tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert (
        train_gpt.main(["--params", "params.yaml", "--variant", "vq", "--tokens", str(root / "tokens")]) == 0
    )
    assert (tmp_path / "models/gpt_vq/model.safetensors").is_file()
    assert len(read_curves(tmp_path / "reports/curves/train_gpt_vq")) == 2
    assert read_json(tmp_path / "metrics/train_gpt_vq.json")["vocab"] == 16


# --- train_renderer ----------------------------------------------------------------------------------


def test_train_renderer_outputs_and_val_accuracy(chain):
    root, _, m = chain
    model = load_renderer(root / "renderer").eval()
    c = model.config
    assert (c.digit_vocab_size, c.vq_vocab_size, c.digit_len, c.vq_len) == (8, 16, 16, 16)
    assert not (root / "renderer.partial").exists()
    metrics = m["renderer"]
    assert metrics["params"] == model.num_params() and metrics["steps"] == 6
    assert metrics["tokens_per_s"] == pytest.approx(32 * metrics["sequences_per_s"])
    assert [int(r["step"]) for r in read_curves(root / "renderer_curves")] == list(range(6))
    samples = list(iter_samples(list_shards(root / "tokens", "val")))
    digit = torch.from_numpy(np.stack([s["digit.npy"] for s in samples]).astype(np.int64)).view(12, 16)
    vq = torch.from_numpy(np.stack([s["vq.npy"] for s in samples]).astype(np.int64)).view(12, 16)
    with torch.no_grad():
        logits = model.logits(digit, vq)
    assert metrics["val_nll"] == pytest.approx(
        float(F.cross_entropy(logits.reshape(-1, 16), vq.reshape(-1))), rel=1e-4
    )
    assert metrics["val_acc"] == pytest.approx(float((logits.argmax(-1) == vq).float().mean()), abs=1e-6)
    assert metrics["val_loss"] > 0 and metrics["val_sequences"] == 12


# --- sample ------------------------------------------------------------------------------------------


def test_digit_samples_follow_the_contract_and_are_class_balanced(chain):
    root, params, m = chain
    shards = list_shards(root / "samples_digit", "samples")
    assert [p.name for p in shards] == ["samples-00000.tar", "samples-00001.tar", "samples-00002.tar"]
    samples = list(iter_samples(shards))
    assert [s["__key__"] for s in samples] == [f"sample_{i:07d}" for i in range(N_SAMPLES)]
    assert [s["cls"] for s in samples] == [i % CLASSES for i in range(N_SAMPLES)]
    assert np.bincount([s["cls"] for s in samples]).tolist() == [2] * CLASSES
    for s in samples:
        assert s["png"].dtype == np.uint8 and s["png"].shape == (32, 32, 3)
        assert (
            s["digit.npy"].dtype == np.uint16 and s["digit.npy"].shape == (4, 4) and s["digit.npy"].max() < 8
        )
        assert s["vq.npy"].dtype == np.uint16 and s["vq.npy"].shape == (4, 4) and s["vq.npy"].max() < 16
    assert len({s["digit.npy"].tobytes() for s in samples}) > 1, "every sample drew the same tokens"
    # the pixels are the VQ decoding of the stored VQ tokens, decoded as the stage batched them (conv kernels
    # pick code paths by batch size, which moves a pixel by one level on some CPUs)
    vq = load_pixel_vq(root / "vq")
    batch = samples[: min(params.sample.batch_size, PER_SHARD)]
    ids = torch.from_numpy(np.stack([s["vq.npy"] for s in batch]).astype(np.int64))
    np.testing.assert_array_equal(to_uint8(vq.decode(ids)), np.stack([s["png"] for s in batch]))
    metrics = m["sample_digit"]
    assert metrics["n"] == metrics["generated"] == N_SAMPLES and metrics["shards"] == 3
    assert metrics["num_classes"] == CLASSES and metrics["images_per_s"] > 0
    assert metrics["gpt_top_k"] == 100 and metrics["gpt_top_p"] == 1.0 and metrics["gpt_cfg_scale"] == 2.0
    assert metrics["renderer_top_p"] == 0.5 and metrics["renderer_top_k"] == 0
    assert metrics["gpt_temperature"] == metrics["renderer_temperature"] == 1.0 and metrics["seed"] == 0
    assert read_json(root / "samples_digit/meta.json")["variant"] == "digit"
    with Image.open(root / "grid_digit.png") as grid:
        # 10 class rows of 32 px images at scale 2 with 2 px padding, under a 16 px title
        assert grid.height == 16 + CLASSES * (64 + 2) + 2


def test_batched_samples_repeat_exactly(chain, tmp_path):
    root, params, m = chain
    assert not params.sample.batch_invariant and m["sample_digit"]["batch_invariant"] == 0  # the default
    _sample(params, root, "digit", tmp_path / "again", grid=None)
    names = sorted(p.name for p in (root / "samples_digit").iterdir())
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == names
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (root / "samples_digit" / name).read_bytes(), name
    # the batch size is part of the settings a partial run is resumed with
    assert read_json(root / "samples_digit/meta.json")["batch_size"] == params.sample.batch_size


def test_batch_invariant_samples_do_not_depend_on_batch_size(chain, tmp_path):
    root, params, _ = chain
    invariant = with_overrides(params, {"sample.batch_invariant": True})
    _sample(invariant, root, "digit", tmp_path / "s4", grid=None)
    _sample(with_overrides(invariant, {"sample.batch_size": 16}), root, "digit", tmp_path / "s16", grid=None)
    names = sorted(p.name for p in (tmp_path / "s4").iterdir())
    assert sorted(p.name for p in (tmp_path / "s16").iterdir()) == names
    for name in names:
        if name.endswith(".tar"):
            assert (tmp_path / "s16" / name).read_bytes() == (tmp_path / "s4" / name).read_bytes(), name


@pytest.mark.slow
def test_two_process_sampling_equals_one_process(chain, tmp_path):
    root, params, m = chain
    dump_params(params, tmp_path / "params.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["-m", "stages.sample", "--params", str(tmp_path / "params.yaml"), "--variant", "digit"]
    paths = {"gpt": "gpt_digit", "renderer": "renderer", "vq": "vq", "tokens": "tokens"}
    for key, name in paths.items():
        args += [f"--{key}", str(root / name)]
    args += ["--out", str(tmp_path / "ddp"), "--grid", str(tmp_path / "grid.png")]
    args += ["--metrics", str(tmp_path / "sample.json")]
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (root / "samples_digit").iterdir())
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == names  # rank 0 wrote meta.json
    for name in names:
        assert (tmp_path / "ddp" / name).read_bytes() == (root / "samples_digit" / name).read_bytes(), name
    metrics = read_json(tmp_path / "sample.json")  # written once, by rank 0, with every rank's count
    assert metrics["world_size"] == 2 and metrics["generated"] == N_SAMPLES == m["sample_digit"]["generated"]
    assert (tmp_path / "grid.png").is_file() and not (tmp_path / "ddp.tmp").exists()


def test_vq_variant_needs_no_renderer_and_is_unconditional(chain, tmp_path, monkeypatch):
    root, params, m = chain
    samples = list(iter_samples(list_shards(root / "samples_vq", "samples")))
    assert len(samples) == N_SAMPLES and all(s["cls"] == sample.NO_CLASS for s in samples)
    assert all("digit.npy" not in s and s["vq.npy"].shape == (4, 4) for s in samples)
    assert m["sample_vq"]["num_classes"] == 0 and not any(k.startswith("renderer_") for k in m["sample_vq"])
    # guidance needs classes: the default cfg_scale falls back to 1 for an unconditional GPT, and says so
    assert params.sample.gpt.cfg_scale != 1.0 and m["sample_vq"]["gpt_cfg_scale"] == 1.0
    assert read_json(root / "samples_vq/meta.json")["gpt"]["cfg_scale"] == 1.0
    # via the CLI, with default paths filled from --variant and no renderer anywhere
    dump_params(params, tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    argv = ["--params", "params.yaml", "--variant", "vq", "--gpt", str(root / "gpt_vq")]
    assert sample.main([*argv, "--vq", str(root / "vq"), "--tokens", str(root / "tokens")]) == 0
    assert not (tmp_path / "models/renderer").exists()
    for shard in list_shards(root / "samples_vq", "samples"):
        assert (tmp_path / "data/samples/vq" / shard.name).read_bytes() == shard.read_bytes()
    assert (tmp_path / "reports/samples_vq.png").is_file()
    assert read_json(tmp_path / "metrics/sample_vq.json")["n"] == N_SAMPLES


def test_sample_refuses_missing_or_mismatched_models(chain, tmp_path):
    root, params, _ = chain
    with pytest.raises(FileNotFoundError, match=r"renderer: no checkpoint there .*stages.train_renderer"):
        sample.run(
            params,
            variant="digit",
            gpt=str(root / "gpt_digit"),
            renderer=str(tmp_path / "renderer"),
            vq=str(root / "vq"),
            tokens=str(root / "tokens"),
            out=str(tmp_path / "s"),
        )
    with pytest.raises(ValueError, match="trained on 'digit' tokens, but the variant is 'vq'"):
        sample.run(
            params,
            variant="vq",
            gpt=str(root / "gpt_digit"),
            vq=str(root / "vq"),
            tokens=str(root / "tokens"),
            out=str(tmp_path / "s"),
        )


def test_killed_sampling_resumes_from_finished_shards_of_the_same_settings(chain, tmp_path, monkeypatch):
    root, params, _ = chain
    real = sample.write_shard

    def kill_during(params, out):
        """Run sample into `out`, killed while writing the second shard."""
        calls = {"n": 0}

        def dies_on_second_shard(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)

        with monkeypatch.context() as mp:
            mp.setattr(sample, "write_shard", dies_on_second_shard)
            with pytest.raises(KeyboardInterrupt):
                _sample(params, root, "digit", out, grid=None)
        assert not out.exists(), "a killed run must not leave finished-looking samples"
        tmp = out.with_name(out.name + ".tmp")
        assert sorted(p.name for p in tmp.iterdir()) == ["meta.json", "samples-00000.tar"]

    kill_during(params, tmp_path / "same")
    resumed = _sample(params, root, "digit", tmp_path / "same", grid=None)
    assert resumed["shards_resumed"] == 1 and resumed["generated"] == N_SAMPLES - PER_SHARD
    for shard in list_shards(root / "samples_digit", "samples"):
        assert (tmp_path / "same" / shard.name).read_bytes() == shard.read_bytes()
    # a partial run with other settings is not reused
    kill_during(params, tmp_path / "other")
    other = _sample(with_overrides(params, {"sample.seed": 1}), root, "digit", tmp_path / "other", grid=None)
    assert other["shards_resumed"] == 0 and other["generated"] == N_SAMPLES
    first = "samples-00000.tar"
    assert (tmp_path / "other" / first).read_bytes() != (root / "samples_digit" / first).read_bytes()


# --- reference-compatible options through the stages ---------------------------------------------------


def test_nar_renderer_trains_samples_and_renders_upper_bounds_through_the_same_stages(chain, tmp_path):
    from pipeline.evaluation import render_true_tokens
    from pipeline.models.nar_renderer import NARRenderer

    root, params, _ = chain
    nar = with_overrides(params, {"train_renderer.model.kind": "nar", "sample.renderer.nar_steps": 3})
    m = train_renderer.run(nar, str(root / "tokens"), str(tmp_path / "renderer"), str(tmp_path / "r_curves"))
    model = load_renderer(tmp_path / "renderer")
    assert isinstance(model, NARRenderer) and m["nar"] == 1 and m["steps"] == 6
    assert 0 < m["val_acc"] <= 1 and math.isfinite(m["val_loss"])
    assert "mask_ratio" in read_curves(tmp_path / "r_curves")[0]
    paths = {"gpt": str(root / "gpt_digit"), "vq": str(root / "vq"), "tokens": str(root / "tokens")}
    s = sample.run(
        nar, variant="digit", renderer=str(tmp_path / "renderer"), out=str(tmp_path / "s"), grid=None, **paths
    )
    assert s["renderer_nar"] == 1 and s["renderer_nar_steps"] == 3 and s["generated"] == N_SAMPLES
    samples = list(iter_samples(list_shards(tmp_path / "s", "samples")))
    assert all(x["vq.npy"].shape == (4, 4) and x["vq.npy"].max() < 16 for x in samples)
    # stage 1 is the same GPT with the same generators: the DiGIT tokens equal the AR chain's
    ar = list(iter_samples(list_shards(root / "samples_digit", "samples")))
    assert all(np.array_equal(a["digit.npy"], b["digit.npy"]) for a, b in zip(samples, ar, strict=True))
    assert read_json(tmp_path / "s/meta.json")["renderer"]["nar_steps"] == 3
    # the evaluation's upper bound path takes the NAR renderer unchanged; image j depends on its index only
    vq = load_pixel_vq(root / "vq")
    digit = torch.from_numpy(np.stack([x["digit.npy"] for x in samples[:4]]).astype(np.int64)).view(4, 16)
    images = render_true_tokens(model, vq, digit, (4, 4), [10, 11, 12, 13], seed=0, steps=3, progress=False)
    again = render_true_tokens(model, vq, digit[2:], (4, 4), [12, 13], seed=0, steps=3, progress=False)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[2:], again)


def test_vq_variant_gets_its_own_model_training_and_sampling_knobs(chain, tmp_path, caplog):
    root, params, _ = chain
    p = with_overrides(
        params,
        {
            "train_gpt.vq_model": {"class_conditional": False, "norm": "post", "use_eos": True},
            "train_gpt.vq_train": {"steps": 4, "lr": 1e-3},
            "sample.gpt_vq": {"temperature": 1.0, "top_k": 5, "top_p": None, "cfg_scale": 2.0},
        },
    )
    assert p.train_gpt.model_for("digit").class_conditional and p.train_gpt.train_for("digit").steps == 6
    m = train_gpt.run(p, "vq", str(root / "tokens"), str(tmp_path / "gpt_vq"), None)
    gpt = load_gpt(tmp_path / "gpt_vq")
    c = gpt.config
    assert (c.num_classes, c.norm, c.use_eos, m["steps"]) == (0, "post", True, 4)
    paths = {"gpt": str(tmp_path / "gpt_vq"), "vq": str(root / "vq"), "tokens": str(root / "tokens")}
    with caplog.at_level("WARNING"):
        s = sample.run(p, variant="vq", out=str(tmp_path / "s"), grid=None, **paths)
    assert "sample.gpt_vq.cfg_scale 2 does not apply" in caplog.text
    assert (s["gpt_top_k"], s["gpt_cfg_scale"], s["num_classes"]) == (5, 1.0, 0)
    assert read_json(tmp_path / "s/meta.json")["gpt"]["top_k"] == 5
    with pytest.raises(Exception, match=r"train_gpt.vq_model: .*norm"):
        with_overrides(params, {"train_gpt.vq_model": {"norm": "middle"}})


def test_a_finer_digit_grid_with_a_merged_renderer_goes_through_the_stages(chain, tmp_path):
    # the encoder at twice the input size: an 8x8 DiGIT grid over the 4x4 VQ grid, the renderer merging 2x2
    root, params, _ = chain
    fine = with_overrides(params, {"encoder.img_size": 64, "train_renderer.model.digit_merge": 2})
    _tokens(fine, root, tmp_path)
    train_gpt.run(fine, "digit", str(tmp_path / "tokens"), str(tmp_path / "gpt_digit"), None)
    m = train_renderer.run(fine, str(tmp_path / "tokens"), str(tmp_path / "renderer"), None)
    renderer = load_renderer(tmp_path / "renderer")
    assert (
        renderer.config.digit_len == 64 and renderer.config.prefix_len == 16 and renderer.config.vq_len == 16
    )
    assert m["digit_len"] == 64 and 0 < m["val_acc"] <= 1
    (tmp_path / "vq").symlink_to(root / "vq")
    s = _sample(fine, tmp_path, "digit", tmp_path / "s", grid=None)
    assert s["generated"] == N_SAMPLES
    samples = list(iter_samples(list_shards(tmp_path / "s", "samples")))
    assert all(x["digit.npy"].shape == (8, 8) and x["vq.npy"].shape == (4, 4) for x in samples)
    assert all(x["png"].shape == (32, 32, 3) for x in samples)
