"""The MaskGIT-style NAR renderer: masking schedules, parallel decoding, determinism, loading, training."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoint import CheckpointError, save_checkpoint
from pipeline.models.nar_renderer import (
    NARRenderer,
    decode_mask_counts,
    expected_train_mask_count,
    train_mask_counts,
)
from pipeline.models.renderer import Renderer, RendererConfig, load_renderer
from pipeline.sampling import sample_generators
from pipeline.train import TrainConfig, fit

N, M, K, V = 6, 8, 20, 24


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_config(**over) -> RendererConfig:
    fields = {"digit_vocab_size": K, "vq_vocab_size": V, "digit_len": N, "vq_len": M}
    fields |= {"n_layer": 2, "n_head": 2, "n_embd": 32, "ffn_dim": 64}
    return RendererConfig(**{**fields, **over})


def batch_of(b: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"digit": torch.randint(0, K, (b, N), generator=g), "vq": torch.randint(0, V, (b, M), generator=g)}


# --- schedules -------------------------------------------------------------------------------------------


def test_training_mask_counts_follow_the_cosine_schedule():
    u = torch.tensor([0.0, 0.5, 1 / 3, 0.999999])
    # min(L, floor(L cos(pi u / 2)) + 1): all at u = 0, floor(256 / sqrt 2) + 1 at 0.5, one as u -> 1
    assert train_mask_counts(256, u).tolist() == [256, 182, 222, 1]
    assert train_mask_counts(1, torch.rand(50)).tolist() == [1] * 50
    g = torch.Generator().manual_seed(0)
    draws = train_mask_counts(64, torch.rand(400_000, generator=g, dtype=torch.float64))
    assert int(draws.min()) >= 1 and int(draws.max()) <= 64
    # the exact expectation the loss is normalised by (sum_j (2/pi) acos(j/L)) against Monte Carlo
    assert float(draws.double().mean()) == pytest.approx(expected_train_mask_count(64), rel=2e-3)
    assert expected_train_mask_count(1) == pytest.approx(1.0)
    assert expected_train_mask_count(256) == pytest.approx(2 / math.pi * 256 + 0.5, rel=1e-3)


def test_decoding_schedule_values():
    # 256 tokens, 8 steps (the reference): floor(256 cos(pi/2 * k/8)), k = 1..7, then nothing masked
    expected = [math.floor(256 * math.cos(math.pi / 2 * k / 8)) for k in range(1, 8)] + [0]
    assert decode_mask_counts(256, 8) == expected == [251, 236, 212, 181, 142, 97, 49, 0]
    # clamped: every step reveals at least one token and keeps at least one masked until the last step
    assert decode_mask_counts(4, 8) == [3, 2, 1, 1, 1, 1, 1, 0]
    assert decode_mask_counts(10, 1) == [0]
    with pytest.raises(ValueError, match="steps >= 1"):
        decode_mask_counts(10, 0)


# --- model -----------------------------------------------------------------------------------------------


def test_attention_is_bidirectional_over_both_segments():
    model = NARRenderer(small_config(), seed=0).eval()
    b = batch_of(2)
    base = model.logits(b["digit"], b["vq"])
    later = b["vq"].clone()
    later[:, -1] = (later[:, -1] + 1) % V
    # changing the last VQ input changes the prediction at the first VQ position (a causal model could not)
    assert not torch.allclose(model.logits(b["digit"], later)[:, 0], base[:, 0])
    digit = b["digit"].clone()
    digit[:, 0] = (digit[:, 0] + 1) % K
    assert not torch.allclose(model.logits(digit, b["vq"]), base)
    assert model.vq_emb.num_embeddings == V + 1 and model.mask_id == V
    assert model.checkpoint_meta()["kind"] == "nar_renderer"


def test_loss_is_label_smoothed_ce_on_the_masked_tokens_over_the_expected_count():
    model = NARRenderer(small_config(label_smoothing=0.1), seed=1).eval()
    b = batch_of(5)
    loss, logs = model.training_loss(b)
    # eval mode draws its masks from a generator seeded with 0: rebuild them
    g = torch.Generator().manual_seed(0)
    u, scores = torch.rand(5, generator=g), torch.rand(5, M, generator=g)
    masked = scores.argsort(1).argsort(1) < train_mask_counts(M, u)[:, None]
    logits = model.logits(b["digit"], b["vq"].masked_fill(masked, V))
    ce = F.cross_entropy(logits.reshape(-1, V), b["vq"].reshape(-1), label_smoothing=0.1, reduction="none")
    expected = (ce.view(5, M) * masked).sum() / (5 * expected_train_mask_count(M))
    assert torch.allclose(loss, expected, atol=1e-6)
    assert logs["mask_ratio"] == pytest.approx(float(masked.float().mean()))
    assert torch.equal(model.training_loss(b)[0], loss)  # deterministic in eval mode
    # in training the masks come from the (seeded) global RNG
    model.train()
    torch.manual_seed(5)
    a = model.training_loss(b)[0]
    torch.manual_seed(5)
    assert torch.equal(model.training_loss(b)[0], a)


def test_a_decode_fills_every_position_in_the_configured_steps():
    model = NARRenderer(small_config(), seed=2).eval()
    digit = batch_of(3)["digit"]
    seen: list[torch.Tensor] = []
    hook = model.vq_emb.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    calls: list[int] = []
    trunk_hook = model.trunk.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = model.generate(digit, sample_generators(0, range(3)), steps=5)
    finally:
        hook.remove()
        trunk_hook.remove()
    assert len(calls) == 5  # one trunk pass per step
    assert out.shape == (3, M) and int(out.min()) >= 0 and int(out.max()) < V  # no MASK left
    # the inputs of step t have exactly the scheduled number of masked positions
    masked_in = [int((ids == V).sum(dim=1).unique().item()) for ids in seen]
    assert masked_in == [M, *decode_mask_counts(M, 5)[:-1]]
    # tokens fixed at a step are never changed later
    for before, after in itertools.pairwise([*seen, out]):
        known = before != V
        assert torch.equal(after[known], before[known])


def test_samples_depend_on_the_seed_and_row_index_only():
    model = NARRenderer(small_config(aligned=True, digit_grid=(2, 3), vq_grid=(2, 4)), seed=3).eval()
    digit = batch_of(4)["digit"]
    kw = {"top_p": 0.9, "steps": 4, "batch_invariant": True}
    a = model.generate(digit, sample_generators(7, range(4)), **kw)
    assert torch.equal(model.generate(digit, sample_generators(7, range(4)), **kw), a)
    assert not torch.equal(model.generate(digit, sample_generators(8, range(4)), **kw), a)
    # row 2 alone, with the generator of index 2, is row 2 of the batch
    alone = model.generate(digit[2:3], sample_generators(7, [2]), **kw)
    assert torch.equal(alone[0], a[2])
    # batched (the default) repeats exactly too
    fast = model.generate(digit, sample_generators(7, range(4)), steps=4)
    assert torch.equal(model.generate(digit, sample_generators(7, range(4)), steps=4), fast)
    # choice temperature 0 and greedy token choice: no randomness left at all
    g1 = model.generate(digit, sample_generators(1, range(4)), temperature=0.0, choice_temperature=0.0)
    g2 = model.generate(digit, sample_generators(2, range(4)), temperature=0.0, choice_temperature=0.0)
    assert torch.equal(g1, g2)


def test_bad_arguments_are_clear_errors():
    model = NARRenderer(small_config())
    digit = batch_of(2)["digit"]
    with pytest.raises(ValueError, match="2 rows of digit_tokens but 1 generators"):
        model.generate(digit, sample_generators(0, range(1)))
    with pytest.raises(ValueError, match="steps must be >= 1"):
        model.generate(digit, sample_generators(0, range(2)), steps=0)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 20\)"):
        model.generate(digit + K, sample_generators(0, range(2)))


def test_load_renderer_dispatches_on_the_checkpoint_kind(tmp_path):
    nar = NARRenderer(small_config(), seed=4)
    ar = Renderer(small_config(), seed=4)
    save_checkpoint(tmp_path / "nar", nar.state_dict(), nar.checkpoint_meta())
    save_checkpoint(tmp_path / "ar", ar.state_dict(), ar.checkpoint_meta())
    loaded = load_renderer(tmp_path / "nar")
    assert isinstance(loaded, NARRenderer) and isinstance(load_renderer(tmp_path / "ar"), Renderer)
    digit = batch_of(2)["digit"]
    assert torch.equal(
        loaded.generate(digit, sample_generators(0, range(2))),
        nar.generate(digit, sample_generators(0, range(2))),
    )
    save_checkpoint(tmp_path / "gpt", ar.state_dict(), {"kind": "gpt", "config": {}})
    with pytest.raises(CheckpointError, match="kind is 'gpt', expected 'renderer' or 'nar_renderer'"):
        load_renderer(tmp_path / "gpt")


def test_tiny_nar_renderer_overfits_and_decodes_its_training_batch(tmp_path):
    model = NARRenderer(small_config(), seed=0)
    batch = batch_of(4, seed=1)
    start, _ = model.eval().training_loss(batch)
    train = TrainConfig(
        steps=200, lr=3e-3, warmup_steps=10, weight_decay=0.0, device="cpu", checkpoint_every=1000
    )
    fit(model, lambda s: itertools.repeat(batch), train, tmp_path / "run", {"kind": "nar"}, progress=False)
    end, logs = model.eval().training_loss(batch)
    assert end.item() < 0.1 * start.item(), (start.item(), end.item())
    out = model.generate(batch["digit"], sample_generators(0, range(4)), temperature=0.0)
    assert (out == batch["vq"]).float().mean() > 0.9
