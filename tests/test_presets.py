"""Presets (presets/*.yaml merged into params.yaml): validation, comments, idempotence, and the paper's model
sizes built from them on the meta device."""

import shutil

import pytest
import torch
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from pipeline.cli import main as cli
from pipeline.config import load_params
from pipeline.presets import PresetError, _eol_comment, apply_presets, available, load_preset
from stages.train_gpt import build_gpt
from stages.train_renderer import build_renderer

from .conftest import REPO

PRESETS = ["imagenet-base", "imagenet-base-cond", "imagenet-large", "imagenet-large-cond", "maskgit-renderer"]


@pytest.fixture
def params_file(tmp_path):
    path = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", path)
    return path


def _token_meta(k: int) -> dict:
    # what tokenize writes for ImageNet: 16 x 16 DiGIT tokens, 16 x 16 tokens of a 1024-code VQGAN
    return {
        "digit": {"field": "digit.npy", "vocab": k, "grid": [16, 16]},
        "vq": {"field": "vq.npy", "vocab": 1024, "grid": [16, 16]},
        "num_classes": 1000,
    }


def test_the_recipes_are_there():
    assert set(PRESETS) <= set(available())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates_and_every_value_says_where_it_comes_from(name, params_file):
    raw = YAML().load((REPO / "presets" / f"{name}.yaml").read_text())

    def leaves(m: CommentedMap, path: str):
        for key, value in m.items():
            if isinstance(value, CommentedMap) and value:
                yield from leaves(value, f"{path}{key}.")
            else:
                yield path + key, _eol_comment(m, key)

    missing = [key for key, comment in leaves(raw, "") if key != "extends" and not comment]
    assert not missing, f"{name}: values without a source comment: {missing}"
    params, changes = apply_presets([name], params_file)
    assert changes and load_params(params_file) == params


def test_the_recipe_values(params_file):
    base, _ = apply_presets(["imagenet-base"], params_file, write=False)
    g, t = base.train_gpt.model, base.train_gpt.train
    assert (g.size, g.norm, g.class_conditional, g.use_eos, g.dropout, g.attn_dropout) == (
        "base",
        "post",
        False,
        True,
        0.1,
        0.0,
    )
    assert (t.batch_size, t.lr, t.warmup_steps, t.warmup_init_lr, t.schedule) == (
        1024,
        3e-4,
        6250,
        1e-7,
        "inverse_sqrt",
    )
    assert (t.weight_decay, t.betas, t.grad_clip, base.train_gpt.model.label_smoothing) == (
        0.01,
        (0.9, 0.98),
        1.0,
        0.1,
    )
    vq_model, vq_train = base.train_gpt.model_for("vq"), base.train_gpt.train_for("vq")
    assert (vq_model.class_conditional, vq_model.norm, vq_train.lr) == (False, "pre", 5e-4)
    s = base.sample
    assert (s.gpt.top_k, s.gpt.cfg_scale, s.renderer.top_p, s.n) == (200, 1.0, 0.8, 50000)
    assert s.gpt_for("vq").top_k is None and s.gpt_for("digit").top_k == 200
    assert (base.kmeans.k, base.encoder.layer, base.encoder.img_size) == (8192, -3, 224)
    assert base.evaluate.fidelity.extractor == "inception-v3-compat"
    cond, _ = apply_presets(["imagenet-base-cond"], params_file, write=False)
    assert cond.train_gpt.model.class_conditional and cond.sample.gpt.top_k == 300
    assert not cond.train_gpt.model_for("vq").class_conditional  # the baseline stays unconditional
    large, _ = apply_presets(["imagenet-large-cond"], params_file, write=False)
    assert (large.kmeans.k, large.train_gpt.model.size, large.sample.gpt.top_k) == (16384, "large", 400)
    assert large.train_gpt.model_for("vq").size == "base"
    nar, _ = apply_presets(["imagenet-base", "maskgit-renderer"], params_file, write=False)
    r = nar.train_renderer
    assert (r.model.kind, r.train.batch_size, nar.sample.renderer.nar_steps) == ("nar", 1024, 8)
    assert nar.sample.renderer.nar_choice_temperature == 4.5 and nar.sample.renderer.top_p is None


@pytest.mark.parametrize(
    "names,k,expected",
    [
        (["imagenet-base"], 8192, 219e6),
        (["imagenet-base-cond"], 8192, 219e6),
        (["imagenet-large"], 16384, 732e6),
        (["imagenet-large-cond"], 16384, 732e6),
    ],
)
def test_preset_gpts_have_the_papers_parameter_counts_on_the_meta_device(names, k, expected, params_file):
    params, _ = apply_presets(names, params_file, write=False)
    with torch.device("meta"):
        gpt = build_gpt(params, _token_meta(k), "digit")
        baseline = build_gpt(params, _token_meta(k), "vq")
        renderer = build_renderer(params, _token_meta(k))
    assert gpt.wte.weight.is_meta
    n = gpt.num_params()
    assert abs(n / expected - 1) < 0.005, n  # 219.6M / 218.6M (unconditional) and 732.3M / 730.8M
    assert gpt.config.norm == "post" and gpt.config.use_eos
    # the baseline (K = 1024 VQGAN codes, unconditional, pre-LN) and the renderer are base-sized
    assert baseline.config.num_classes == 0 and (baseline.config.n_layer, baseline.config.n_embd) == (
        16,
        1024,
    )
    assert 200e6 < baseline.num_params() < 210e6
    assert (renderer.config.n_layer, renderer.config.n_embd) == (16, 1024)


def test_merging_keeps_the_params_file_layout_and_comments(params_file):
    before = params_file.read_text()
    apply_presets(["imagenet-base"], params_file)
    after = params_file.read_text()
    # untouched lines and section headers survive; changed values carry the preset's source comment
    for line in (
        "# Every knob of the pipeline, one section per stage. Validated by pipeline/config.py before any work.",
        "# Stage-2 renderer: true DiGIT tokens → VQ tokens.",
        "# Sampling: n per variant, sample i seeded by (seed, i); null disables top_k / top_p.",
        "  seed: 0               # root seed; each stage derives its own",
    ):
        assert line in before and line in after, line
    k_line = next(line for line in after.splitlines() if line.startswith("  k: "))
    assert k_line.startswith("  k: 8192") and "preprocess/run.sh CLUSTER=8192" in k_line
    assert len(after.splitlines()) > len(before.splitlines())  # vq_model, gpt_vq became block mappings
    # applying it again changes nothing
    _, changes = apply_presets(["imagenet-base"], params_file)
    assert changes == [] and params_file.read_text() == after


def test_bad_presets_are_clear_errors(tmp_path, params_file):
    with pytest.raises(PresetError, match="no .*imagenet-huge.yaml; available: imagenet-base"):
        apply_presets(["imagenet-huge"], params_file)
    bad = tmp_path / "bad.yaml"
    bad.write_text("kmeans:\n  kay: 5  # typo\n")
    with pytest.raises(PresetError, match=r"kmeans\.kay: unknown key"):
        apply_presets([str(bad)], params_file)
    assert params_file.read_text() == (REPO / "params.yaml").read_text()  # nothing written
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(PresetError, match="loops back"):
        load_preset("a", tmp_path)


def test_cli_preset_dry_run_and_write(params_file, capsys):
    assert (
        cli(["preset", "imagenet-base", "maskgit-renderer", "--params", str(params_file), "--dry-run"]) == 0
    )
    out = capsys.readouterr().out
    assert "train_renderer.model.kind: 'ar' -> 'nar'" in out and "would change" in out
    assert params_file.read_text() == (REPO / "params.yaml").read_text()
    assert cli(["preset", "imagenet-base", "--params", str(params_file)]) == 0
    assert load_params(params_file).kmeans.k == 8192
    assert cli(["preset", "nope", "--params", str(params_file)]) == 2
    assert "available" in capsys.readouterr().err
