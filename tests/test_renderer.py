import itertools

import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoint import CheckpointError, save_checkpoint
from pipeline.models.gpt import GPT_SIZES, Block
from pipeline.models.renderer import RENDERER_SIZES, Renderer, RendererConfig, load_renderer, renderer_config
from pipeline.sampling import sample_generators
from pipeline.train import TrainConfig, fit


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Many tiny ops: on the shared 2-core test machine two torch threads that spin-wait for each other ran
    # these tests ~5x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


N, M, K, V = 6, 8, 20, 24


def small_config(**over) -> RendererConfig:
    fields = {"digit_vocab_size": K, "vq_vocab_size": V, "digit_len": N, "vq_len": M}
    fields |= {"n_layer": 2, "n_head": 2, "n_embd": 32, "ffn_dim": 64}
    return RendererConfig(**{**fields, **over})


def batch_of(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"digit": torch.randint(0, K, (b, N), generator=g), "vq": torch.randint(0, V, (b, M), generator=g)}


def test_sizes_and_segments():
    assert RENDERER_SIZES == GPT_SIZES
    cfg = renderer_config("tiny", digit_vocab_size=512, vq_vocab_size=256, digit_len=64, vq_len=64)
    assert (cfg.n_layer, cfg.n_embd) == (GPT_SIZES["tiny"]["n_layer"], GPT_SIZES["tiny"]["n_embd"])
    model = Renderer(small_config())
    # Separate vocabularies and position tables for the two segments; SEP is an extra VQ-input id.
    assert model.digit_emb.weight.shape == (K, 32) and model.vq_emb.weight.shape == (V + 1, 32)
    assert model.digit_pos.weight.shape == (N, 32) and model.vq_pos.weight.shape == (M, 32)
    assert model.head.out_features == V
    # The trunk is gpt.py's, not a copy.
    assert all(isinstance(b, Block) for b in model.trunk.blocks)


def test_loss_is_on_the_vq_segment_only():
    model = Renderer(small_config(), seed=1).eval()
    batch = batch_of(3)
    loss, logs = model.training_loss(batch)
    logits = model.logits(batch["digit"], batch["vq"])
    assert logits.shape == (3, M, V)  # one prediction per VQ token; the DiGIT segment has no target
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, V), batch["vq"].reshape(-1)), atol=1e-6)
    assert 0.0 <= logs["acc"] <= 1.0
    # The last VQ token is a target only: changing it changes the loss but no logit.
    changed = {**batch, "vq": batch["vq"].clone()}
    changed["vq"][:, -1] = (changed["vq"][:, -1] + 1) % V
    assert torch.equal(model.logits(changed["digit"], changed["vq"]), logits)
    assert not torch.equal(model.training_loss(changed)[0], loss)
    # Changing v1 changes the predictions after it, not the first one (made at SEP).
    changed = {**batch, "vq": batch["vq"].clone()}
    changed["vq"][:, 0] = (changed["vq"][:, 0] + 1) % V
    after = model.logits(changed["digit"], changed["vq"])
    assert torch.equal(after[:, 0], logits[:, 0]) and not torch.allclose(after[:, 1:], logits[:, 1:])
    # Every prediction is conditioned on the DiGIT tokens (the last one too).
    digit = (batch["digit"] + 1) % K
    assert not torch.allclose(model.logits(digit, batch["vq"])[:, -1], logits[:, -1])


def test_bad_batches_are_rejected():
    model = Renderer(small_config())
    batch = batch_of(2)
    with pytest.raises(ValueError, match=r"batch\['vq'\]: expected int64 ids \[B, 8\]"):
        model.training_loss({**batch, "vq": batch["vq"][:, :5]})
    with pytest.raises(ValueError, match=r"batch\['digit'\]: ids must be in \[0, 20\)"):
        model.training_loss({**batch, "digit": batch["digit"] + K})
    with pytest.raises(ValueError, match="2 rows of digit_tokens but 3 generators"):
        model.generate(batch["digit"], sample_generators(0, range(3)))


def test_kv_cache_generation_equals_full_recompute():
    model = Renderer(small_config(), seed=3)
    digit = batch_of(3)["digit"]
    for batch_invariant in (True, False):
        kw = {"top_p": 0.8, "batch_invariant": batch_invariant}
        fast = model.generate(digit, sample_generators(2, range(3)), use_cache=True, **kw)
        slow = model.generate(digit, sample_generators(2, range(3)), use_cache=False, **kw)
        assert fast.shape == (3, M)
        assert torch.equal(fast, slow)


def test_renderer_learns_a_token_mapping(tmp_path):
    # VQ tokens are a fixed function of the DiGIT tokens; after training, greedy rendering reproduces them.
    cfg = small_config(digit_len=4, vq_len=4)
    g = torch.Generator().manual_seed(0)
    digit = torch.randint(0, K, (8, 4), generator=g)
    batch = {"digit": digit, "vq": (digit * 7 + 3) % V}
    model = Renderer(cfg, seed=0)
    start, _ = model.training_loss(batch)
    train = TrainConfig(
        steps=150, lr=3e-3, warmup_steps=10, weight_decay=0.0, device="cpu", checkpoint_every=1000
    )
    summary = fit(
        model, lambda s: itertools.repeat(batch), train, tmp_path / "run", {"kind": "r"}, progress=False
    )
    assert summary["final_loss"] < 0.1 * start.item()
    out = model.generate(digit, sample_generators(0, range(8)), temperature=0.0)
    assert (out == batch["vq"]).float().mean() > 0.95


def test_checkpoint_roundtrip(tmp_path):
    model = Renderer(small_config(), seed=5)
    save_checkpoint(tmp_path / "r", model.state_dict(), model.checkpoint_meta())
    loaded = load_renderer(tmp_path / "r")
    digit = batch_of(2)["digit"]
    assert torch.equal(
        loaded.generate(digit, sample_generators(0, range(2))),
        model.generate(digit, sample_generators(0, range(2))),
    )
    save_checkpoint(tmp_path / "g", model.state_dict(), {"kind": "gpt", "config": {}})
    with pytest.raises(CheckpointError, match="kind is 'gpt', expected 'renderer'"):
        load_renderer(tmp_path / "g")


def test_aligned_index_maps_vq_cells_to_the_digit_cell_under_them():
    from pipeline.models.renderer import aligned_index

    assert aligned_index((2, 3), (2, 3)).tolist() == list(range(6))  # same grid: identity
    # a 4x4 VQ grid over a 2x2 DiGIT grid: each DiGIT cell covers a 2x2 block of VQ cells
    assert aligned_index((2, 2), (4, 4)).view(4, 4).tolist() == [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 3, 3],
        [2, 2, 3, 3],
    ]
    with pytest.raises(ValueError, match="aligned needs digit_grid"):
        small_config(aligned=True)
    with pytest.raises(ValueError, match="not a 2-D grid of 8 tokens"):
        small_config(aligned=True, digit_grid=(2, 3), vq_grid=(3, 3))


def test_aligned_renderer_conditions_each_vq_token_on_its_digit_cell(tmp_path):
    cfg = small_config(aligned=True, digit_grid=(2, 3), vq_grid=(2, 4))
    model = Renderer(cfg, seed=2).eval()
    batch = batch_of(3)
    logits = model.logits(batch["digit"], batch["vq"])
    # VQ token 4 (row 1, col 0) lies in DiGIT cell (1, 0) = index 3 and gets it directly: changing it through
    # the shortcut alone (the prefix's copy held fixed) moves prediction 4 and later ones, not earlier ones
    changed = batch["digit"].clone()
    changed[:, 3] = (changed[:, 3] + 1) % K
    aligned = model._aligned(changed)
    x = torch.cat(
        [model._prefix(batch["digit"], aligned), model._embed_vq(batch["vq"][:, :-1], 0, aligned)], 1
    )
    only_aligned = model.head(model.trunk(x)[:, cfg.digit_len :])
    moved = (only_aligned - logits).abs().amax(dim=(0, 2))
    assert moved[4] > 0 and moved[:4].max() == 0
    # still autoregressive: changing v1 leaves the first prediction alone; cache equals recompute
    vq = batch["vq"].clone()
    vq[:, 0] = (vq[:, 0] + 1) % V
    assert torch.equal(model.logits(batch["digit"], vq)[:, 0], logits[:, 0])
    for batch_invariant in (True, False):
        kw = {"top_p": 0.9, "batch_invariant": batch_invariant}
        fast = model.generate(batch["digit"], sample_generators(1, range(3)), use_cache=True, **kw)
        slow = model.generate(batch["digit"], sample_generators(1, range(3)), use_cache=False, **kw)
        assert torch.equal(fast, slow)
    save_checkpoint(tmp_path / "r", model.state_dict(), model.checkpoint_meta())
    loaded = load_renderer(tmp_path / "r")
    assert loaded.config == cfg and torch.equal(loaded.logits(batch["digit"], batch["vq"]), logits)


def test_merge_blocks_groups_each_block_in_raster_order():
    from pipeline.models.renderer import merge_blocks

    x = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid of scalars 0..15, raster order
    assert merge_blocks(x, (4, 4), 2)[0].tolist() == [
        [0, 1, 4, 5],
        [2, 3, 6, 7],
        [8, 9, 12, 13],
        [10, 11, 14, 15],
    ]
    assert torch.equal(merge_blocks(x, (4, 4), 1), x)


def test_merged_renderer_has_a_short_prefix_and_each_vq_token_sees_its_whole_block(tmp_path):
    # a 4x4 DiGIT grid over a 2x2 VQ grid, merged 2x2: the prefix has 4 positions, not 16
    cfg = small_config(digit_len=16, vq_len=4, aligned=True, digit_grid=(4, 4), vq_grid=(2, 2), digit_merge=2)
    assert cfg.prefix_len == 4 and cfg.merged_grid == (2, 2)
    model = Renderer(cfg, seed=4).eval()
    g = torch.Generator().manual_seed(0)
    digit, vq = torch.randint(0, K, (3, 16), generator=g), torch.randint(0, V, (3, 4), generator=g)
    logits = model.logits(digit, vq)
    assert logits.shape == (3, 4, V)
    assert model._prefix(digit, model._aligned(digit)).shape == (3, 4 + 1, cfg.n_embd)
    # DiGIT token 6 (row 1, col 2) lies in block (0, 1), which holds VQ cell 1: through the aligned shortcut
    # alone (the prefix held fixed) it moves prediction 1 and later ones, not prediction 0 — and it would
    # not, without the merge, since VQ cell 1's centre falls on DiGIT token 7 alone
    changed = digit.clone()
    changed[:, 6] = (changed[:, 6] + 1) % K
    aligned = model._aligned(changed)
    x = torch.cat([model._prefix(digit, aligned), model._embed_vq(vq[:, :-1], 0, aligned)], 1)
    moved = (model.head(model.trunk(x)[:, cfg.prefix_len :]) - logits).abs().amax(dim=(0, 2))
    assert moved[1] > 0 and moved[0] == 0
    for batch_invariant in (True, False):
        kw = {"top_p": 0.9, "batch_invariant": batch_invariant}
        fast = model.generate(digit, sample_generators(1, range(3)), use_cache=True, **kw)
        slow = model.generate(digit, sample_generators(1, range(3)), use_cache=False, **kw)
        assert fast.shape == (3, 4) and torch.equal(fast, slow)
    save_checkpoint(tmp_path / "r", model.state_dict(), model.checkpoint_meta())
    loaded = load_renderer(tmp_path / "r")
    assert loaded.config == cfg and torch.equal(loaded.logits(digit, vq), logits)


def test_merge_needs_a_grid_it_divides():
    with pytest.raises(ValueError, match="digit_merge: 2 needs a digit_grid whose rows and cols it divides"):
        small_config(digit_len=9, digit_grid=(3, 3), digit_merge=2)
    with pytest.raises(ValueError, match="digit_merge: 2 needs a digit_grid"):
        small_config(digit_merge=2)
