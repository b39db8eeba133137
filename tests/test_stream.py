"""ShardStream with augmented token views: one view per sample per epoch, seeded, resumable, rank-free."""

import numpy as np
import pytest

from pipeline.shards import write_shard
from pipeline.stream import ShardStream, token_views

SIZES, V = (5, 7, 4), 3
FIELDS = {"tokens": "digit.npy", "vq": "vq.npy", "label": "cls"}
VIEWS = {"digit.npy": "digit_views.npy", "vq.npy": "vq_views.npy"}


def _code(shard: int, row: int, view: int) -> int:
    return 1000 * shard + 10 * row + view


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Token grids whose every id says (shard, row, view); vq ids are digit ids + 5."""
    d = tmp_path_factory.mktemp("tok")
    paths = []
    for s, n in enumerate(SIZES):
        samples = []
        for r in range(n):
            grids = np.stack([np.full((2, 2), _code(s, r, v), np.uint16) for v in range(V)])
            fields = {
                "digit.npy": grids[0],
                "digit_views.npy": grids[1:],
                "vq.npy": grids[0] + 5,
                "vq_views.npy": grids[1:] + 5,
                "cls": s,
            }
            samples.append((f"train_{s}_{r:03d}", fields))
        write_shard(d / f"train-{s:05d}.tar", samples)
        paths.append(d / f"train-{s:05d}.tar")
    return paths


def _decode(batch):
    code = batch["tokens"][:, 0].numpy()
    return [(int(c) // 1000, int(c) % 1000 // 10, int(c) % 10) for c in code]


def test_one_view_per_sample_per_epoch_shared_by_all_fields(shards):
    n = sum(SIZES)
    stream = ShardStream(shards, FIELDS, global_batch=n, seed=3, views=VIEWS, num_views=V)
    seen_views, epochs = set(), []
    for epoch in range(4):
        batch = stream.batch(epoch)  # a global batch of n = exactly one epoch
        assert batch["tokens"].shape == (n, 4) and batch["vq"].shape == (n, 4)
        assert (batch["tokens"] == batch["tokens"][:, :1]).all()  # a whole grid comes from one view
        decoded = _decode(batch)
        assert sorted((s, r) for s, r, _ in decoded) == [
            (s, r) for s, k in enumerate(SIZES) for r in range(k)
        ]
        np.testing.assert_array_equal(batch["vq"].numpy(), batch["tokens"].numpy() + 5)  # the same view
        assert [s for s, _, _ in decoded] == batch["label"].tolist()
        assert [v for _, _, v in decoded] == [stream.view_of(epoch * n + pos) for pos in range(n)]
        seen_views |= {v for _, _, v in decoded}
        epochs.append(decoded)
    assert seen_views == set(range(V))
    # each epoch draws new views of the same samples (not only a new order)
    views_by_sample = [dict(((s, r), v) for s, r, v in d) for d in epochs]
    assert all(a != b for a, b in zip(views_by_sample, views_by_sample[1:], strict=False))


def test_views_are_resumable_and_rank_independent(shards):
    def make(**kw):
        return ShardStream(shards, FIELDS, global_batch=6, seed=7, views=VIEWS, num_views=V, **kw)

    run = make()
    first = [run.batch(s) for s in range(12)]  # 72 samples: several epochs of 16
    resumed = make()
    for step in (11, 5, 0):  # any step, in any order, from a fresh stream
        for name in FIELDS:
            np.testing.assert_array_equal(resumed.batch(step)[name], first[step][name])
    ranks = [make(rank=r, world=2) for r in range(2)]
    for step in range(12):
        halves = [rk.batch(step) for rk in ranks]
        for name in FIELDS:
            np.testing.assert_array_equal(np.concatenate([h[name] for h in halves]), first[step][name])
    other_seed = ShardStream(shards, FIELDS, global_batch=6, seed=8, views=VIEWS, num_views=V)
    assert any(_decode(other_seed.batch(s)) != _decode(first[s]) for s in range(12))


def test_single_view_stream_reads_view_zero_only(shards):
    plain = ShardStream(shards, FIELDS, global_batch=8, seed=3)
    ignored = ShardStream(shards, FIELDS, global_batch=8, seed=3, views=VIEWS, num_views=1)
    for step in range(4):
        a, b = plain.batch(step), ignored.batch(step)
        assert {v for _, _, v in _decode(a)} == {0}
        for name in FIELDS:
            np.testing.assert_array_equal(a[name], b[name])
    # The sample order does not depend on the views: a V-view stream visits the same (shard, row) sequence.
    viewed = ShardStream(shards, FIELDS, global_batch=8, seed=3, views=VIEWS, num_views=V)
    for step in range(4):
        assert [x[:2] for x in _decode(viewed.batch(step))] == [x[:2] for x in _decode(plain.batch(step))]


def test_views_shape_mismatch_and_meta(shards):
    with pytest.raises(ValueError, match=r"digit_views.npy has shape \[2, 2, 2\], expected 4 views"):
        ShardStream(shards, FIELDS, global_batch=4, seed=0, views=VIEWS, num_views=5)
    with pytest.raises(KeyError, match="no field 'nope.npy'"):
        ShardStream(shards, FIELDS, global_batch=4, seed=0, views={"digit.npy": "nope.npy"}, num_views=V)
    meta = {
        "digit": {"field": "digit.npy", "views_field": "digit_views.npy"},
        "vq": {"field": "vq.npy", "views_field": "vq_views.npy"},
        "views": 3,
    }
    assert token_views(meta) == (3, VIEWS)
    assert token_views({"digit": {"field": "digit.npy"}, "vq": {"field": "vq.npy"}}) == (1, {})
    with pytest.raises(ValueError, match="views is 2 but no token field names its views_field"):
        token_views({"digit": {"field": "digit.npy"}, "views": 2})
