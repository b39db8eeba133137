"""The tokenizer data path as it runs at scale: rank-sharded extract and tokenize under torchrun (gloo) give
the bytes of one process, and the paper's shapes (DINOv2-B/14 at 224, 256 patches × 768) run end to end."""

import multiprocessing
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest

from pipeline.config import dump_params
from pipeline.encoders import RandomWeightsWarning
from pipeline.features import open_features
from pipeline.io import read_json
from pipeline.shards import iter_samples, list_shards
from pipeline.stream import read_token_meta
from stages import extract, kmeans, prepare, tokenize, train_vq

from .conftest import REPO, tiny_params

pytestmark = pytest.mark.slow

TINY_VQ = dict(
    train_vq__channels=8,
    train_vq__codebook_size=16,
    train_vq__codebook_dim=4,
    train_vq__train={"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
)


def _tree(directory):
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def _stage(name, world, params_path, cwd, **paths):
    args = ["--params", str(params_path)]
    for key, value in paths.items():
        args += [f"--{key}", str(value)]
    if world == 1:
        cmd = [sys.executable, "-m", f"stages.{name}", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
        cmd += ["-m", f"stages.{name}", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{name} ×{world}:\n{proc.stderr[-4000:]}"
    return read_json(paths["metrics"])


def test_two_ranks_write_the_bytes_of_one_process(one_thread, encoder_dir, tmp_path):
    # 12 sampled images in chunks of 5 and 5 image shards: both split unevenly over 2 ranks.
    params = tiny_params(
        encoder__source="ssl",
        encoder__weights=str(encoder_dir),
        extract__sample=0.5,
        extract__chunk_images=5,
        kmeans__k=8,
        kmeans__sample_patches=150,
        tokenize__views=2,
        tokenize__batch_size=4,
        **TINY_VQ,
    )
    prepare.run(params, out=str(tmp_path / "images"))
    train_vq.run(params, images=str(tmp_path / "images"), out=str(tmp_path / "vq"), curves=None)
    dump_params(params, tmp_path / "params.yaml")
    p = tmp_path / "params.yaml"
    m = {}
    for world in (1, 2):
        out = tmp_path / f"features_{world}.zarr"
        m[world] = _stage(
            "extract",
            world,
            p,
            tmp_path,
            images=tmp_path / "images",
            out=out,
            metrics=tmp_path / f"e{world}.json",
        )
    assert (m[1]["world_size"], m[2]["world_size"]) == (1, 2)
    assert m[1]["chunks"] == m[2]["chunks"] == 3
    one, two = _tree(tmp_path / "features_1.zarr"), _tree(tmp_path / "features_2.zarr")
    assert len(one) > 5 and one == two
    assert not list(tmp_path.glob("*.partial"))
    kmeans.run(params, features=str(tmp_path / "features_1.zarr"), out=str(tmp_path / "kmeans"))
    for world in (1, 2):
        m[world] = _stage(
            "tokenize",
            world,
            p,
            tmp_path,
            kmeans=tmp_path / "kmeans",
            images=tmp_path / "images",
            vq=tmp_path / "vq",
            out=tmp_path / f"tokens_{world}",
            metrics=tmp_path / f"t{world}.json",
        )
    one, two = _tree(tmp_path / "tokens_1"), _tree(tmp_path / "tokens_2")
    assert sorted(one) == [
        "meta.json",
        *[f"train-0000{i}.tar" for i in range(3)],
        "val-00000.tar",
        "val-00001.tar",
    ]
    assert one == two
    timing = {"seconds", "world_size"}
    assert {k: v for k, v in m[1].items() if k not in timing} == {
        k: v for k, v in m[2].items() if k not in timing
    }
    # and both equal what the stage writes in this process
    tokenize.run(
        params,
        kmeans=str(tmp_path / "kmeans"),
        images=str(tmp_path / "images"),
        vq=str(tmp_path / "vq"),
        out=str(tmp_path / "tokens_here"),
    )
    assert _tree(tmp_path / "tokens_here") == one


def _pool_map(fn, jobs, out_dir):
    """A map_jobs that runs every job in a fresh daemonic process (spawn: nothing inherited, everything
    pickled), as a Dask worker would; results come back in job order."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        return pool.starmap(fn, [(job, out_dir) for job in jobs])


def test_shard_jobs_run_in_other_processes(one_thread, encoder_dir, tmp_path, monkeypatch):
    """The map_jobs contract of pipeline/stage.py: job functions and jobs pickle, models load per process,
    and DataLoader workers are not started inside a daemonic worker (Dask's are daemonic)."""
    params = tiny_params(
        encoder__source="ssl",
        encoder__weights=str(encoder_dir),
        extract__sample=0.5,
        extract__chunk_images=5,
        extract__workers=1,
        kmeans__k=8,
        kmeans__sample_patches=150,
        tokenize__views=2,
        tokenize__workers=1,
        tokenize__batch_size=4,
        **TINY_VQ,
    )
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prepare.run(params, out=str(tmp_path / "images"))
    train_vq.run(params, images=str(tmp_path / "images"), out=str(tmp_path / "vq"), curves=None)
    images = str(tmp_path / "images")
    extract.run(params, images=images, out=str(tmp_path / "f_loop.zarr"))
    m = extract.run(params, images=images, out=str(tmp_path / "f_pool.zarr"), map_jobs=_pool_map)
    assert m["chunks"] == 3 and _tree(tmp_path / "f_loop.zarr") == _tree(tmp_path / "f_pool.zarr")
    kmeans.run(params, features=str(tmp_path / "f_loop.zarr"), out=str(tmp_path / "kmeans"))
    paths = dict(kmeans=str(tmp_path / "kmeans"), images=images, vq=str(tmp_path / "vq"))
    loop = tokenize.run(params, out=str(tmp_path / "t_loop"), **paths)
    pool = tokenize.run(params, out=str(tmp_path / "t_pool"), map_jobs=_pool_map, **paths)
    assert _tree(tmp_path / "t_loop") == _tree(tmp_path / "t_pool")
    assert {k: v for k, v in loop.items() if k != "seconds"} == {
        k: v for k, v in pool.items() if k != "seconds"
    }
    job = tokenize.functools.partial(tokenize.tokenize_shard, None)
    assert pickle.loads(pickle.dumps(job)).func is tokenize.tokenize_shard  # module-level: pickled by name


def test_imagenet_shaped_tokenizer_runs_end_to_end(one_thread, tmp_path):
    """DINOv2-B/14 (random weights) at 224 on 256-px images: 256 patches × 768, K-Means, V = 2 views."""
    params = tiny_params(
        base__image_size=256,  # stored like the paper's VQGAN input; the encoder resizes to 224
        prepare__train_size=16,
        prepare__val_size=8,
        prepare__shard_size=8,
        encoder__source="random",
        encoder__name="vit_base_patch14_reg4_dinov2",
        encoder__img_size=224,
        encoder__layer=0,  # the paper reads block -3; block 0 has the same shapes for a tenth of the forward
        encoder__weights=None,
        extract__sample=0.25,
        extract__batch_size=4,
        kmeans__k=16,
        kmeans__sample_patches=1024,
        tokenize__views=2,
        tokenize__batch_size=8,
        tokenize__workers=1,
        **TINY_VQ,
    )
    prepare.run(params, out=str(tmp_path / "images"))
    train_vq.run(params, images=str(tmp_path / "images"), out=str(tmp_path / "vq"), curves=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        m_ext = extract.run(params, images=str(tmp_path / "images"), out=str(tmp_path / "features.zarr"))
        kmeans.run(params, features=str(tmp_path / "features.zarr"), out=str(tmp_path / "kmeans"))
        m_tok = tokenize.run(
            params,
            kmeans=str(tmp_path / "kmeans"),
            images=str(tmp_path / "images"),
            vq=str(tmp_path / "vq"),
            out=str(tmp_path / "tokens"),
        )
    store = open_features(tmp_path / "features.zarr")
    assert store["train/patches"].shape == (4, 256, 768)  # 16 / 14 px patches of 224: 16 × 16 = 256
    assert store.attrs["random_weights"] and store.attrs["grid"] == [16, 16] and m_ext["dim"] == 768
    assert m_ext["store_bytes_per_image"] >= 256 * 768 * 2
    assert np.load(tmp_path / "kmeans/centroids.npy").shape == (16, 768)
    meta = read_token_meta(tmp_path / "tokens")
    assert meta["digit"]["grid"] == [16, 16] and meta["views"] == 2
    assert meta["vq"]["grid"] == [32, 32]  # the tiny VQ: 256 / 4 / 2
    samples = list(iter_samples(list_shards(tmp_path / "tokens", "val")))
    assert len(samples) == 8
    for s in samples:
        assert s["digit.npy"].shape == (16, 16) and s["digit_views.npy"].shape == (1, 16, 16)
        assert s["vq_views.npy"].shape == (1, 32, 32) and s["digit.npy"].max() < 16
    assert m_tok["train_images"] == 16 and m_tok["val_images"] == 8
