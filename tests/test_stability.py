import math

import pytest
import torch

from pipeline.metrics.stability import (
    add_noise_at_snr,
    image_noise,
    measured_snr_db,
    stability_table,
)

SNRS = (30, 20, 10, 5, 1)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: intra-op threads only add synchronisation cost on a shared 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _images(n: int = 12, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _constant_tokenizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b = x.shape[0]
    return torch.zeros(b, 16, dtype=torch.long), torch.ones(b, 16, 8)


def _whole_image_tokenizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One latent per image = the image itself (T=1, D=3HW); tokens = pixels quantised to 8 levels."""
    step = 0.25
    return torch.floor(x / step).long().flatten(1), x.flatten(1).unsqueeze(1)


def test_noise_has_the_requested_snr():
    x = _images(8) * 0.5 + 0.2  # non-zero mean: the SNR counts the signal's power, not its variance
    noise = torch.stack([image_noise(x.shape[1:], seed=3, index=i) for i in range(len(x))])
    for snr in SNRS:
        measured = measured_snr_db(x, add_noise_at_snr(x, snr, noise))
        assert measured.shape == (8,)
        # 3072 noise samples per image: the realised power is within a few percent (~0.2 dB)
        assert torch.allclose(measured, torch.full_like(measured, float(snr)), atol=0.3), (snr, measured)


def test_noise_is_a_function_of_seed_and_index_only():
    a = image_noise((3, 4, 4), seed=1, index=5)
    assert torch.equal(a, image_noise((3, 4, 4), seed=1, index=5))
    assert not torch.equal(a, image_noise((3, 4, 4), seed=1, index=6))
    assert not torch.equal(a, image_noise((3, 4, 4), seed=2, index=5))


def test_tokenizer_ignoring_its_input_is_perfectly_stable():
    rows = stability_table(_constant_tokenizer, _images(), SNRS, seed=0, batch_size=5, progress=False)
    assert [r["snr_db"] for r in rows] == list(SNRS)
    for r in rows:
        assert r["change_rate"] == 0.0
        assert r["cosine"] == pytest.approx(1.0, abs=1e-12)
        assert r["measured_snr_db"] == pytest.approx(r["snr_db"], abs=0.3)


def test_pixel_tokenizer_matches_analytic_expectations():
    rows = stability_table(_whole_image_tokenizer, _images(16), SNRS, seed=0, batch_size=8, progress=False)
    rates = [r["change_rate"] for r in rows]
    assert all(a < b for a, b in zip(rates, rates[1:], strict=False)), rates  # more noise, more flips
    for r in rows:
        # With D = 3072, |x + n|^2 ~= |x|^2 (1 + 10^(-snr/10)) and x.n ~= 0, so cos ~= 1 / sqrt(1 + 10^(-snr/10)).
        expected = 1.0 / math.sqrt(1.0 + 10 ** (-r["snr_db"] / 10))
        assert r["cosine"] == pytest.approx(expected, abs=0.01)
    # Small noise on pixels spread uniformly within their bins: P(flip) ~= E|n| / step = sigma sqrt(2/pi) / step,
    # with sigma^2 = E[x^2] / 10^(snr/10) = (1/3) / 1000 for uniform [-1, 1] pixels at 30 dB.
    sigma = math.sqrt((1 / 3) / 10**3)
    assert rows[0]["change_rate"] == pytest.approx(sigma * math.sqrt(2 / math.pi) / 0.25, rel=0.15)


def test_reproducible_and_independent_of_batch_size():
    x = _images(10)
    a = stability_table(_whole_image_tokenizer, x, SNRS, seed=4, batch_size=3, progress=False)
    b = stability_table(_whole_image_tokenizer, x, SNRS, seed=4, batch_size=10, progress=False)
    c = stability_table(_whole_image_tokenizer, x, SNRS, seed=5, batch_size=10, progress=False)
    for ra, rb in zip(a, b, strict=True):
        assert ra["change_rate"] == rb["change_rate"]
        assert ra["cosine"] == pytest.approx(rb["cosine"], abs=1e-12)
    assert [r["change_rate"] for r in a] != [r["change_rate"] for r in c]


def test_clear_errors():
    with pytest.raises(ValueError, match=r"images: expected float \[N, C, H, W\]"):
        stability_table(_constant_tokenizer, torch.zeros(2, 3, 4, 4, dtype=torch.uint8), progress=False)
    with pytest.raises(ValueError, match=r"float latents \[B=2, T, D\]"):
        stability_table(
            lambda x: (torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)), _images(2), progress=False
        )
    with pytest.raises(ValueError, match=r"integer tokens"):
        stability_table(lambda x: (torch.zeros(2, 4), torch.zeros(2, 4, 1)), _images(2), progress=False)
