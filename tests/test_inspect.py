import pytest
from PIL import Image

from pipeline.cli import main as digit_main
from pipeline.inspect import inspect_artifact
from stages import prepare

from .conftest import tiny_params


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "images"
    prepare.run(tiny_params(), out=str(out))
    return out


def test_inspect_image_dir_counts_and_grid(images_dir, tmp_path):
    text = inspect_artifact(images_dir, tmp_path)
    assert text.startswith("[image shards]")
    assert "train: 24 images" in text and "val: 12 images" in text
    assert "circle=3" in text  # 24 train images round-robin over 10 classes → classes 0-3 have 3
    assert "stored image size (H×W): 32×32" in text
    pngs = list(tmp_path.glob("*_grid.png"))
    assert len(pngs) == 1
    with Image.open(pngs[0]) as im:
        assert im.width > 64 and im.height > 64


def test_inspect_single_shard(images_dir, tmp_path):
    text = inspect_artifact(images_dir / "val-00000.tar", tmp_path)
    assert "val: 10 images" in text


def test_inspect_cli_unknown_and_missing(tmp_path, capsys):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"x")
    assert digit_main(["inspect", str(junk), "--reports", str(tmp_path)]) == 2
    assert "not a recognised pipeline artifact" in capsys.readouterr().err
    assert digit_main(["inspect", str(tmp_path / "nope")]) == 2
    assert "no such file" in capsys.readouterr().err
