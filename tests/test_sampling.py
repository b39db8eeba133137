import pytest
import torch

from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.renderer import Renderer, RendererConfig
from pipeline.sampling import (
    cfg_combine,
    derive_seed,
    process_logits,
    sample_generators,
    sample_rows,
    sample_seed,
    top_k_mask,
    top_p_mask,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Many tiny ops: on the shared 2-core test machine two torch threads that spin-wait for each other ran
    # these tests ~5x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


NEG = float("-inf")


def test_sample_seed_is_a_function_of_seed_and_index_only():
    assert sample_seed(7, 3) == sample_seed(7, 3)
    seeds = {sample_seed(s, i) for s in range(4) for i in range(50)}
    assert len(seeds) == 200  # no collisions, and (0, 1) != (1, 0)
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, 1) != derive_seed(1, 0)
    # generator of sample 5 is the same whichever range it is created in
    a = sample_generators(11, range(5, 6))[0]
    b = sample_generators(11, range(0, 8))[5]
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_top_k_mask_keeps_the_k_largest_and_ties():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 1.0, 1.0, 1.0, -1.0]])
    out = top_k_mask(logits, 2)
    assert torch.equal(torch.isfinite(out[0]), torch.tensor([False, True, False, True, False]))
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])  # kept values untouched
    assert torch.equal(torch.isfinite(out[1]), torch.tensor([False, True, True, True, False]))  # ties kept
    assert torch.equal(top_k_mask(logits, None), logits)
    assert torch.equal(top_k_mask(logits, 0), logits)
    assert torch.equal(top_k_mask(logits, 5), logits)


def test_top_p_mask_keeps_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().unsqueeze(0)
    kept = lambda p: torch.isfinite(top_p_mask(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert kept(0.4) == [False, True, False, False]  # the top id alone already has 0.5
    assert kept(0.9) == [False, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # the most probable id is always kept
    assert kept(1.0) == [True, True, True, True]
    # Permuting the ids permutes the result.
    perm = torch.tensor([2, 0, 3, 1])
    assert torch.equal(top_p_mask(logits[:, perm], 0.7), top_p_mask(logits, 0.7)[:, perm])
    with pytest.raises(ValueError, match="top_p"):
        top_p_mask(logits, 0.0)


def test_process_logits_applies_temperature_then_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = process_logits(logits, temperature=0.5, top_k=3)
    assert torch.allclose(out[0, :3], logits[0, :3] / 0.5)
    assert out[0, 3] == NEG
    with pytest.raises(ValueError, match="temperature"):
        process_logits(logits, temperature=-1.0)


def test_cfg_scale_one_is_the_conditional_logits():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 10, generator=g), torch.randn(3, 10, generator=g)
    assert torch.equal(cfg_combine(cond, uncond, 1.0), cond)
    assert torch.allclose(cfg_combine(cond, uncond, 0.0), uncond, atol=1e-6)
    assert torch.allclose(cfg_combine(cond, uncond, 2.5), uncond + 2.5 * (cond - uncond), atol=1e-5)


def test_sample_rows_uses_each_rows_own_generator():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g)
    draw = lambda rows, seeds: sample_rows(logits[rows], sample_generators(0, seeds))  # noqa: E731
    full = draw([0, 1, 2, 3], [0, 1, 2, 3])
    # A row's draw depends on its logits and its generator only: not on its neighbours or the batch size.
    assert draw([2], [2]).item() == full[2].item()
    assert torch.equal(draw([3, 1], [3, 1]), full[[3, 1]])
    # Same generator, same row: same id on a re-run; greedy is argmax.
    assert torch.equal(draw([0, 1, 2, 3], [0, 1, 2, 3]), full)
    greedy = sample_rows(logits, sample_generators(0, range(4)), greedy=True)
    assert torch.equal(greedy, logits.argmax(-1))
    with pytest.raises(ValueError, match="generators"):
        sample_rows(logits, sample_generators(0, range(3)))
    broken = logits.clone()
    broken[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"rows \[2\] have no valid distribution"):
        sample_rows(broken, sample_generators(0, range(4)))


def test_sample_rows_frequencies_and_masked_ids():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    n = 20000
    logits = probs.log().expand(n, 4)
    ids = sample_rows(logits, sample_generators(3, range(n)))
    counts = torch.bincount(ids, minlength=4).double() / n
    assert counts[1] == 0  # a -inf logit is never drawn
    # 4.5 standard errors of a proportion: fails only if the draw is biased.
    tol = 4.5 * torch.sqrt(probs.double() * (1 - probs.double()) / n) + 1e-12
    assert torch.all((counts - probs.double()).abs() <= tol), counts
    masked = top_k_mask(torch.tensor([[0.0, 3.0, 1.0, 2.0]]).expand(500, 4), 2)
    assert set(sample_rows(masked, sample_generators(4, range(500))).tolist()) == {1, 3}


def _tiny_gpt(num_classes: int = 0) -> GPT:
    cfg = GPTConfig(
        vocab_size=64, block_size=12, n_layer=2, n_head=2, n_embd=32, ffn_dim=64, num_classes=num_classes
    )
    return GPT(cfg, seed=5)


def test_gpt_batch_invariant_samples_do_not_depend_on_batch_size():
    model = _tiny_gpt(num_classes=5)
    labels = torch.arange(16) % 5
    kwargs = {"temperature": 1.0, "top_k": 40, "top_p": 0.95, "batch_invariant": True}
    whole = model.generate(sample_generators(123, range(16)), labels=labels, **kwargs)
    # Uneven parts on purpose: CPU kernels take other code paths for 1-3 rows than for 16.
    bounds = [0, 1, 3, 6, 10, 16]
    parts = [
        model.generate(sample_generators(123, range(a, b)), labels=labels[a:b], **kwargs)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    assert whole.shape == (16, 12)
    assert torch.equal(torch.cat(parts), whole)
    by4 = [
        model.generate(sample_generators(123, range(i, i + 4)), labels=labels[i : i + 4], **kwargs)
        for i in (0, 4)
    ]
    assert torch.equal(torch.cat(by4), whole[:8])
    # Different seeds give different samples (the test above is not vacuous).
    other = model.generate(sample_generators(124, range(16)), labels=labels, **kwargs)
    assert not torch.equal(other, whole)
    # Guided sampling too (doubles the rows internally).
    g16 = model.generate(sample_generators(9, range(16)), labels=labels, cfg_scale=2.0, batch_invariant=True)
    g4 = torch.cat(
        [
            model.generate(
                sample_generators(9, range(i, i + 4)),
                labels=labels[i : i + 4],
                cfg_scale=2.0,
                batch_invariant=True,
            )
            for i in range(0, 16, 4)
        ]
    )
    assert torch.equal(g4, g16)


def test_batched_gpt_samples_repeat_exactly_and_spend_the_same_draws():
    model = _tiny_gpt(num_classes=5)
    labels = torch.arange(16) % 5
    kwargs = {"labels": labels, "top_k": 40, "cfg_scale": 2.0}
    gens = sample_generators(3, range(16))
    first = model.generate(gens, **kwargs)
    # the default is batched; the same params give the same samples in a second run
    assert torch.equal(model.generate(sample_generators(3, range(16)), **kwargs), first)
    # every row spent exactly block_size uniforms of its own stream, in either mode, so what follows (the
    # renderer's draws) does not depend on the mode
    rowwise_gens = sample_generators(3, range(16))
    model.generate(rowwise_gens, batch_invariant=True, **kwargs)
    fresh = sample_generators(3, range(16))
    for g in fresh:
        torch.rand(12, generator=g, dtype=torch.float64)
    after = [torch.rand(3, generator=g) for g in fresh]
    assert all(torch.equal(torch.rand(3, generator=g), x) for g, x in zip(gens, after, strict=True))
    assert all(torch.equal(torch.rand(3, generator=g), x) for g, x in zip(rowwise_gens, after, strict=True))
    # a row's uniforms are its own: greedy (temperature 0) equals the argmax path whatever the draws
    greedy = model.generate(sample_generators(0, range(4)), labels=labels[:4], temperature=0.0)
    assert torch.equal(
        greedy, model.generate(sample_generators(1, range(4)), labels=labels[:4], temperature=0.0)
    )


def test_renderer_batch_invariant_samples_do_not_depend_on_batch_size():
    cfg = RendererConfig(
        digit_vocab_size=32,
        vq_vocab_size=48,
        digit_len=8,
        vq_len=10,
        n_layer=2,
        n_head=2,
        n_embd=32,
        ffn_dim=64,
    )
    model = Renderer(cfg, seed=2)
    digit = torch.randint(0, 32, (16, 8), generator=torch.Generator().manual_seed(0))
    whole = model.generate(digit, sample_generators(5, range(16)), top_p=0.8, batch_invariant=True)
    parts = [
        model.generate(
            digit[i : i + 4], sample_generators(5, range(i, i + 4)), top_p=0.8, batch_invariant=True
        )
        for i in range(0, 16, 4)
    ]
    assert whole.shape == (16, 10)
    assert torch.equal(torch.cat(parts), whole)
    assert int(whole.min()) >= 0 and int(whole.max()) < 48
    batched = model.generate(digit, sample_generators(5, range(16)), top_p=0.8)
    assert torch.equal(batched, model.generate(digit, sample_generators(5, range(16)), top_p=0.8))
