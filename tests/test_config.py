import subprocess
import sys

import pytest
import yaml

from pipeline.config import Params, ParamsError, load_params, parse_params, with_overrides
from pipeline.ssl.config import SSLConfig

from .conftest import REPO


def test_shipped_params_validate_and_match_schema_defaults():
    shipped = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = Params()
    for section in Params.model_fields:
        # every key is spelled out in params.yaml (DVC tracks params by key)
        assert set(raw[section]) == set(type(getattr(defaults, section)).model_fields), section
        if (
            section != "pretrain_encoder"
        ):  # its defaults are SSLConfig's; params.yaml holds the tuned CPU recipe
            assert getattr(shipped, section) == getattr(defaults, section), (
                f"{section} drifted from the schema"
            )


def test_out_of_range_value_names_key_value_and_bound():
    with pytest.raises(ParamsError) as e:
        parse_params({"prepare": {"train_size": -5}}, "params.yaml")
    msg = str(e.value)
    assert "params.yaml: prepare.train_size" in msg
    assert "-5" in msg and "greater than or equal to 1" in msg


def test_unknown_key_is_rejected_with_its_path():
    with pytest.raises(ParamsError, match=r"prepare\.trian_size: unknown key"):
        parse_params({"prepare": {"trian_size": 5}})


def test_unknown_section_is_rejected():
    with pytest.raises(ParamsError, match=r"tokenise: unknown key"):
        parse_params({"tokenise": {}})


def test_wrong_type_names_expected_type():
    with pytest.raises(ParamsError, match=r"base\.image_size: Input should be a valid integer.*got 'big'"):
        parse_params({"base": {"image_size": "big"}})


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ParamsError, match=r"prepare\.source: Input should be 'builtin' or 'imagefolder'"):
        parse_params({"prepare": {"source": "web"}})


def test_cross_field_rule_imagefolder_needs_root():
    with pytest.raises(ParamsError, match=r"needs prepare\.root"):
        parse_params({"prepare": {"source": "imagefolder"}})


def test_all_errors_reported_at_once():
    with pytest.raises(ParamsError) as e:
        parse_params({"prepare": {"train_size": 0, "shard_size": "x"}, "base": {"seed": -1}})
    msg = str(e.value)
    for key in ("prepare.train_size", "prepare.shard_size", "base.seed"):
        assert key in msg


def test_load_params_file_errors(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("prepare: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    top = tmp_path / "list.yaml"
    top.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(top)


def test_overrides_are_validated():
    p = with_overrides(Params(), {"prepare.train_size": 7})
    assert p.prepare.train_size == 7 and p.prepare.val_size == Params().prepare.val_size
    with pytest.raises(ParamsError, match="prepare.val_size"):
        with_overrides(Params(), {"prepare.val_size": 0})


def test_extract_sample_is_a_fraction_or_a_count_and_crops_are_ranges():
    assert parse_params({"extract": {"sample": 0.1}}).extract.sample == 0.1
    count = parse_params({"extract": {"sample": 5000}}).extract.sample
    assert count == 5000 and isinstance(count, int)
    with pytest.raises(ParamsError, match=r"extract: sample: a fraction must lie in \(0, 1\], got 1.5"):
        parse_params({"extract": {"sample": 1.5}})
    with pytest.raises(ParamsError, match=r"extract: sample: a count of images must be >= 1, got 0"):
        parse_params({"extract": {"sample": 0}})
    with pytest.raises(ParamsError, match=r"tokenize.crop: scale must satisfy 0 < min <= max <= 1"):
        parse_params({"tokenize": {"crop": {"scale": [0.9, 0.5]}}})
    with pytest.raises(ParamsError, match=r"tokenize.views: Input should be greater than or equal to 1"):
        parse_params({"tokenize": {"views": 0}})
    assert parse_params({"tokenize": {"workers": "auto"}}).tokenize.workers == "auto"
    with pytest.raises(ParamsError, match=r"extract: workers must be >= 0 or 'auto', got -1"):
        parse_params({"extract": {"workers": -1}})


def test_reading_params_imports_neither_timm_nor_the_training_code():
    # Every stage validates params first; the schema must not drag in timm/torchvision (≈ 2 s per stage).
    code = (
        "import sys; import pipeline.config; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision') "
        "or m in ('pipeline.ssl.vit', 'pipeline.ssl.joint', 'pipeline.ssl.dino', 'pipeline.encoders')); "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_ssl_package_exports_resolve_lazily():
    import pipeline.ssl as ssl

    assert ssl.SSLConfig is SSLConfig
    assert callable(ssl.build_vit) and callable(ssl.vit_kwargs)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ssl.nope  # noqa: B018


def test_renderer_digit_merge_is_for_the_ar_renderer_only():
    ok = parse_params({"train_renderer": {"model": {"digit_merge": 2}}})
    assert ok.train_renderer.model.digit_merge == 2
    with pytest.raises(ParamsError, match=r"train_renderer\.model.*digit_merge 2 needs kind ar"):
        parse_params({"train_renderer": {"model": {"kind": "nar", "digit_merge": 2}}})
    with pytest.raises(ParamsError, match=r"train_renderer\.model\.digit_merge.*greater than or equal to 1"):
        parse_params({"train_renderer": {"model": {"digit_merge": 0}}})
