import numpy as np
import pytest

from pipeline.shards import ShardError, iter_samples, list_shards, write_shard


def test_round_trip_png_npy_cls(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        (
            f"train_{i:07d}",
            {
                "png": rng.integers(0, 256, (8, 6, 3), dtype=np.uint8),
                "digit.npy": rng.integers(0, 60000, (4, 4)).astype(np.uint16),
                "cls": i % 3,
            },
        )
        for i in range(5)
    ]
    assert write_shard(tmp_path / "train-00000.tar", samples) == 5
    back = list(iter_samples(list_shards(tmp_path, "train")))
    assert [b["__key__"] for b in back] == [k for k, _ in samples]
    for (_, f), b in zip(samples, back, strict=True):
        np.testing.assert_array_equal(b["png"], f["png"])
        assert b["digit.npy"].dtype == np.uint16
        np.testing.assert_array_equal(b["digit.npy"], f["digit.npy"])
        assert b["cls"] == f["cls"]


def test_same_samples_give_identical_bytes(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_shard(tmp_path / name / "val-00000.tar", [("val_0000000", {"png": img, "cls": 1})])
    assert (tmp_path / "a/val-00000.tar").read_bytes() == (tmp_path / "b/val-00000.tar").read_bytes()


def test_keys_with_dots_are_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(ValueError, match="no|only letters"):
        write_shard(tmp_path / "train-00000.tar", [("bad.key", {"cls": 1})])
    assert not (tmp_path / "train-00000.tar").exists()


def test_missing_shards_error_names_directory(tmp_path):
    with pytest.raises(ShardError, match=str(tmp_path)):
        list_shards(tmp_path, "train")
