import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.prepare import manifest_classes, read_manifest
from pipeline.shards import iter_samples, list_shards
from pipeline.synthetic import generate_images
from stages import prepare

from .conftest import tiny_params


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_builtin_same_seed_byte_identical_and_seed_matters(tmp_path):
    params = tiny_params()
    m1 = prepare.run(params, out=str(tmp_path / "a"))
    prepare.run(params, out=str(tmp_path / "b"))
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    prepare.run(tiny_params(base__seed=1), out=str(tmp_path / "c"))
    assert _files(tmp_path / "a")["train-00000.tar"] != _files(tmp_path / "c")["train-00000.tar"]
    assert m1["train_images"] == 24 and m1["val_images"] == 12
    assert m1["train_shards"] == 3 and m1["val_shards"] == 2
    assert not (tmp_path / "a.tmp").exists()


def test_builtin_shards_match_generator_and_manifest(tmp_path):
    params = tiny_params()
    prepare.run(params, out=str(tmp_path / "img"))
    samples = list(iter_samples(list_shards(tmp_path / "img", "val")))
    images, labels = generate_images(12, 32, 0, params.base.num_classes, split="val")
    np.testing.assert_array_equal(np.stack([s["png"] for s in samples]), images)
    assert [s["cls"] for s in samples] == labels.tolist()
    table = read_manifest(tmp_path / "img")
    assert table.num_rows == 36
    assert set(table.column("split").to_pylist()) == {"train", "val"}
    assert manifest_classes(table)[:3] == ["circle", "triangle", "square"]
    assert len(set(table.column("key").to_pylist())) == 36


def test_generator_is_index_stable_and_varied():
    a, la = generate_images(20, 32, 3, 10)
    b, lb = generate_images(5, 32, 3, 10, start=15)
    np.testing.assert_array_equal(a[15:], b)
    np.testing.assert_array_equal(la[15:], lb)
    assert np.bincount(la, minlength=10).tolist() == [2] * 10
    # nuisance factors vary: same-class images differ a lot
    assert np.abs(a[0].astype(int) - a[10].astype(int)).mean() > 10


def _make_tree(root):
    rng = np.random.default_rng(0)
    good = lambda: Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))  # noqa: E731
    (root / "cats").mkdir(parents=True)
    (root / "dogs").mkdir()
    (root / "empty_class").mkdir()
    good().save(root / "cats/ok.jpg")
    good().convert("CMYK").save(root / "cats/cmyk.jpg")
    good().convert("L").save(root / "cats/gray.png")
    Image.fromarray((np.arange(50 * 50).reshape(50, 50) * 26).astype(np.uint16)).save(
        root / "dogs/deep16.png"
    )
    good().convert("RGBA").save(root / "dogs/alpha.png")
    good().convert("P").save(root / "dogs/palette.png")
    full = root / "dogs/full.jpg"
    good().save(full, quality=95)
    (root / "dogs/truncated.jpg").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    full.unlink()
    (root / "dogs/notes.txt").write_text("not an image")


def test_imagefolder_ingest_converts_skips_and_reports(tmp_path):
    root = tmp_path / "folder"
    _make_tree(root)
    params = tiny_params(prepare__source="imagefolder", prepare__root=str(root), prepare__val_fraction=0.3)
    metrics = prepare.run(params, out=str(tmp_path / "img"))
    table = read_manifest(tmp_path / "img")
    sources = set(table.column("source").to_pylist())
    assert sources == {
        "cats/ok.jpg",
        "cats/cmyk.jpg",
        "cats/gray.png",
        "dogs/deep16.png",
        "dogs/alpha.png",
        "dogs/palette.png",
    }
    assert manifest_classes(table) == ["cats", "dogs", "empty_class"]
    skipped = (tmp_path / "img/skipped.csv").read_text()
    assert "dogs/truncated.jpg,cannot decode" in skipped
    assert "dogs/notes.txt,not an image" in skipped
    assert "empty_class,empty class folder" in skipped
    assert metrics["skipped"] == 3 and metrics["empty_class_folders"] == 1
    assert metrics["train_images"] + metrics["val_images"] == 6
    rows = {r["source"]: r for r in table.to_pylist()}
    assert (rows["cats/ok.jpg"]["w"], rows["cats/ok.jpg"]["h"]) == (60, 40)
    by_key = {}
    for split in ("train", "val"):
        if metrics[f"{split}_images"]:
            by_key.update({s["__key__"]: s for s in iter_samples(list_shards(tmp_path / "img", split))})
    for src, row in rows.items():
        img = by_key[row["key"]]["png"]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8, src
    deep = by_key[rows["dogs/deep16.png"]["key"]]["png"]
    # 16-bit values rescaled (not clipped to white): the ramp spans dark to bright
    assert deep.min() < 60 and 150 < deep.max() <= 255 and np.unique(deep).size > 20
    gray = by_key[rows["cats/gray.png"]["key"]]["png"]
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_unusable_symlinks_are_listed_not_dropped(tmp_path):
    root = tmp_path / "folder"
    _make_tree(root)
    (root / "cats/gone.jpg").symlink_to(root / "cats/deleted-long-ago.jpg")  # dangling
    (root / "cats/loop.png").symlink_to(root / "cats/loop.png")  # points at itself
    (root / "dogs/subdir").symlink_to(root / "cats", target_is_directory=True)  # to a directory
    (root / "dogs/alias.png").symlink_to(root / "dogs/alpha.png")  # a good link is an image like any other
    (root / "lonely").mkdir()
    (root / "lonely/dead.png").symlink_to(tmp_path / "nowhere.png")  # the class's only file
    params = tiny_params(prepare__source="imagefolder", prepare__root=str(root), prepare__val_fraction=0.3)
    metrics = prepare.run(params, out=str(tmp_path / "img"))
    skipped = (tmp_path / "img/skipped.csv").read_text().splitlines()
    reasons = {line.split(",", 1)[0]: line.split(",", 1)[1] for line in skipped[1:]}
    assert (
        reasons["cats/gone.jpg"].startswith("dangling symlink")
        and "deleted-long-ago.jpg" in reasons["cats/gone.jpg"]
    )
    assert reasons["cats/loop.png"].startswith("dangling symlink")
    assert reasons["dogs/subdir"].startswith("not a regular file")
    assert reasons["lonely/dead.png"].startswith("dangling symlink")
    assert "lonely" not in reasons, "a class folder holding a (broken) file is not empty"
    assert metrics["skipped"] == 3 + 4 and metrics["empty_class_folders"] == 1
    sources = set(read_manifest(tmp_path / "img").column("source").to_pylist())
    assert "dogs/alias.png" in sources and len(sources) == 7


def test_imagefolder_with_train_val_dirs_keeps_splits(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("a", "b"):
            d = tmp_path / "f" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 30), (i * 40, 10, 10)).save(d / f"{i}.png")
    params = tiny_params(prepare__source="imagefolder", prepare__root=str(tmp_path / "f"))
    m = prepare.run(params, out=str(tmp_path / "img"))
    assert (m["train_images"], m["val_images"]) == (6, 4)
    table = pq.read_table(tmp_path / "img/manifest.parquet")
    val = [r for r in table.to_pylist() if r["split"] == "val"]
    assert all(r["source"].startswith("val/") for r in val)


def test_no_usable_image_is_a_clear_error_and_keeps_previous_output(tmp_path):
    root = tmp_path / "junk"
    (root / "x").mkdir(parents=True)
    (root / "x/a.png").write_bytes(b"garbage")
    out = tmp_path / "img"
    prepare.run(tiny_params(), out=str(out))
    before = _files(out)
    params = tiny_params(prepare__source="imagefolder", prepare__root=str(root))
    with pytest.raises(ValueError, match=r"(?s)no usable image at all.*x/a.png: not an image"):
        prepare.run(params, out=str(out))
    assert _files(out) == before, "a failed run must not touch the previous output"
    assert not (tmp_path / "img.tmp").exists()


def test_missing_root_is_a_clear_error(tmp_path):
    params = tiny_params(prepare__source="imagefolder", prepare__root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="prepare.root.*is not a directory"):
        prepare.run(params, out=str(tmp_path / "img"))


def test_stage_cli_help_and_bad_params(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare.main(["--help"])
    assert e.value.code == 0
    assert "WebDataset" in capsys.readouterr().out
    bad = tmp_path / "p.yaml"
    bad.write_text("prepare: {train_size: -1}\n")
    assert prepare.main(["--params", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "prepare.train_size" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
