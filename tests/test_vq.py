"""The pixel VQ tokenizer: shapes, quantiser maths (argmin, EMA, restarts), determinism, training."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from pipeline.checkpoint import save_checkpoint
from pipeline.live import read_curves
from pipeline.models.vq import EMAQuantizer, VQConfig, VQModel, codebook_usage, load_vq, psnr, vq_meta

TINY = dict(
    channels=8, channel_mult=(1, 2), stem=1, num_res_blocks=1, norm_groups=4, codebook_size=32, codebook_dim=8
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convs on a shared 2-core machine: a second OpenMP thread mostly spin-waits (measured ~17x slower).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shapes_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Coloured squares and discs on striped backgrounds, [n, 3, size, size] in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, 3, size, size), dtype=np.float32)
    for i in range(n):
        bg = rng.uniform(-1, 1, 3)[:, None, None] * (0.6 + 0.3 * np.sin(2 * np.pi * rng.integers(1, 4) * xx))
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2 if i % 2 else (abs(xx - cx) < r) & (abs(yy - cy) < r)
        out[i] = np.where(mask, rng.uniform(-1, 1, 3)[:, None, None], bg)
    return torch.from_numpy(out).clamp(-1, 1)


def train_steps(model: VQModel, images: torch.Tensor, steps: int, batch: int = 8, lr: float = 3e-3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % images.shape[0]
        loss, _ = model.training_loss({"image": images[idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_optimizer_step(step)


def test_shapes_and_ranges():
    model = VQModel(VQConfig(**TINY))
    x = shapes_images(3)
    ids = model.encode(x)
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 32
    y = model.decode(ids)
    assert y.shape == x.shape and float(y.min()) >= -1 and float(y.max()) <= 1
    assert torch.equal(model.reconstruct(x), y)
    flat_ids, latents = model.tokens_and_latents(x)
    assert torch.equal(flat_ids, ids.flatten(1))
    assert torch.equal(latents, model.encode_latents(x).permute(0, 2, 3, 1).reshape(3, 64, 8))
    assert model.token_shape(64, 32) == (32, 16)
    assert VQModel(VQConfig()).token_shape(64, 64) == (8, 8)  # the default: 64x64 -> 8x8
    assert VQModel(VQConfig(**{**TINY, "stem": 2})).encode(torch.zeros(1, 3, 16, 16)).shape == (1, 4, 4)
    with pytest.raises(ValueError, match="not divisible by the downsample factor 2"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        model.encode(torch.zeros(3, 16, 16))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 32\)"):
        model.decode(torch.full((1, 8, 8), 32))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="rec_loss"):
        VQConfig(rec_loss="huber")
    with pytest.raises(ValueError, match="norm_groups=8"):
        VQConfig(channels=12, norm_groups=8)
    with pytest.raises(ValueError, match="ema_decay"):
        VQConfig(ema_decay=1.0)
    assert VQConfig(channel_mult=[1, 2]).channel_mult == (1, 2)  # lists from JSON


def test_psnr_and_usage_values():
    a = torch.zeros(2, 3, 4, 4)
    b = a + 0.2  # mse 0.04 on range 2 -> 10 log10(4 / 0.04) = 20 dB
    assert float(psnr(a, b)) == pytest.approx(20.0, abs=1e-4)
    usage, perplexity = codebook_usage(torch.tensor([0, 0, 1, 1]), 8)
    assert usage == pytest.approx(2 / 8) and perplexity == pytest.approx(2.0)
    with pytest.raises(ValueError, match="codebook_size 4"):
        codebook_usage(torch.tensor([5]), 4)


def test_indices_equal_brute_force_argmin():
    q = EMAQuantizer(64, 16, decay=0.9, eps=1e-5, restart_unused_steps=0, seed=3)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 16, generator=g) * 1.5
    brute = ((z.double()[:, None, :] - q.codebook.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(q.nearest(z), brute)
    # Same ids through the module's [B, D, h, w] path.
    zz = z[:496].view(4, 124, 16).permute(0, 2, 1).reshape(4, 16, 4, 31)
    _, _, ids = q.eval()(zz)
    assert torch.equal(ids.flatten(), q.nearest(zz.permute(0, 2, 3, 1).reshape(-1, 16)))


def _initialised_quantizer(codebook: torch.Tensor, decay: float, restart: int = 0) -> EMAQuantizer:
    q = EMAQuantizer(
        codebook.shape[0], codebook.shape[1], decay=decay, eps=1e-5, restart_unused_steps=restart, seed=0
    )
    q.codebook.copy_(codebook)
    q.embed_sum.copy_(codebook)
    q.initialized.fill_(1)
    return q.train()


def test_ema_update_moves_codes_toward_assigned_outputs():
    codebook = torch.tensor([[0.0, 0.0], [10.0, 10.0], [-10.0, 10.0]])
    q = _initialised_quantizer(codebook, decay=0.8)
    # Points near code 0 (mean (1, 1)) and near code 1 (mean (9, 11)); code 2 gets nothing.
    z = torch.tensor([[0.5, 1.5], [1.5, 0.5], [9.0, 11.0]])
    z_e = z.t().reshape(1, 2, 1, 3).requires_grad_(True)
    _, _, ids = q(z_e)
    assert ids.flatten().tolist() == [0, 0, 1]
    q.update(step=1)

    # By hand: N = 0.8 * 1 + 0.2 * n, m = 0.8 * e + 0.2 * sum(z), Laplace-smoothed, e' = m / N~.
    n = torch.tensor([0.8 + 0.2 * 2, 0.8 + 0.2 * 1, 0.8])
    m = 0.8 * codebook + 0.2 * torch.stack([z[0] + z[1], z[2], torch.zeros(2)])
    smoothed = (n + 1e-5) / (n.sum() + 3 * 1e-5) * n.sum()
    assert torch.allclose(q.codebook, m / smoothed[:, None], atol=1e-5)
    assert torch.allclose(q.cluster_size, n)
    # Used codes moved toward their assigned means; the unused code stayed (almost) where it was.
    means = torch.stack([z[:2].mean(0), z[2]])
    assert ((q.codebook[:2] - means).norm(dim=1) < (codebook[:2] - means).norm(dim=1)).all()
    assert torch.allclose(q.codebook[2], codebook[2], atol=1e-3)
    assert q.unused_steps.tolist() == [0, 0, 1]


def test_update_without_training_forward_is_a_no_op():
    q = _initialised_quantizer(torch.eye(3), decay=0.5)
    before = q.codebook.clone()
    with torch.no_grad():
        q(torch.randn(1, 3, 2, 2))  # inference passes never feed the EMA
    q.update(step=0)
    assert torch.equal(q.codebook, before)


def test_dead_code_restart_revives_unused_codes():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0], [-100.0, 100.0]])
    q = _initialised_quantizer(codebook, decay=0.9, restart=3)
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [1.1, 0.9], [0.9, 1.1], [0.2, 0.2], [1.0, 0.8]])
    z_e = z.t().reshape(1, 2, 2, 3)
    for step in range(3):
        q(z_e.clone().requires_grad_(True))
        q.update(step)
        if step < 2:
            assert q.unused_steps.tolist() == [0, 0, step + 1, step + 1]
    # After 3 unused steps codes 2 and 3 are re-initialised from this batch's encoder outputs (distinct rows).
    assert q.last_restarted == 2
    for k in (2, 3):
        assert any(torch.equal(q.codebook[k], row) for row in z), q.codebook[k]
    assert not torch.equal(q.codebook[2], q.codebook[3])
    assert q.unused_steps.tolist() == [0, 0, 0, 0]
    assert q.cluster_size[2:].tolist() == [1.0, 1.0]
    # Revived: the restarted codes now win some assignments.
    _, _, ids = q(z_e.clone().requires_grad_(True))
    assert {2, 3} & set(ids.flatten().tolist())


def test_first_update_initialises_codebook_from_data():
    model = VQModel(VQConfig(**TINY)).train()
    x = shapes_images(4)
    loss, _ = model.training_loss({"image": x})
    loss.backward()
    z = model.encode_latents(x).detach().permute(0, 2, 3, 1).reshape(-1, 8)
    model.after_optimizer_step(0)  # parameters unchanged (no optimizer step), so z is the pool
    assert int(model.quantizer.initialized) == 1
    matches = (model.quantizer.codebook[:, None, :] == z[None]).all(-1).any(1)
    assert bool(matches.all()), "every code should be a copy of an encoder output"


def test_training_is_deterministic_on_cpu():
    x = shapes_images(16, seed=1)
    states = []
    for _ in range(2):
        model = VQModel(VQConfig(**TINY, restart_unused_steps=2))
        train_steps(model, x, steps=6)
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    # A different seed gives a different model.
    other = VQModel(VQConfig(**TINY, seed=1))
    assert not torch.equal(other.encoder.conv_in.weight, VQModel(VQConfig(**TINY)).encoder.conv_in.weight)


def test_fit_improves_psnr_and_checkpoint_round_trips(tmp_path):
    from pipeline.train import TrainConfig, fit

    train_x, val_x = shapes_images(64, seed=2), shapes_images(16, seed=3)
    cfg = VQConfig(**TINY)
    model = VQModel(cfg)
    untrained = float(psnr(model.reconstruct(val_x), val_x))

    def batches(start: int):
        step = start
        while True:
            g = torch.Generator().manual_seed(step)
            yield {"image": train_x[torch.randint(0, 64, (16,), generator=g)]}
            step += 1

    tcfg = TrainConfig(
        steps=150, lr=3e-3, warmup_steps=5, weight_decay=0.0, log_every=10, device="cpu", seed=0
    )
    summary = fit(model, batches, tcfg, tmp_path / "run", vq_meta(cfg), tmp_path / "curves", progress=False)
    assert summary["steps_run"] == 150
    model.eval()
    trained = float(psnr(model.reconstruct(val_x), val_x))
    assert trained > untrained + 5.0, (untrained, trained)
    usage, _ = codebook_usage(model.encode(val_x), cfg.codebook_size)
    assert usage > 0.25
    assert {"psnr", "perplexity", "usage", "commit"} <= set(read_curves(tmp_path / "curves")[0])

    loaded = load_vq(tmp_path / "run" / "last")
    assert loaded.cfg == cfg
    assert torch.equal(loaded.encode(val_x), model.encode(val_x))
    assert torch.equal(loaded.decode(model.encode(val_x)), model.reconstruct(val_x))


def test_fit_resume_is_exact(tmp_path):
    # The codebook, its EMA statistics and restart counters live in buffers and restart draws depend on
    # (seed, step) only, so a run stopped at step 6 and resumed ends where an uninterrupted run does.
    from pipeline.train import TrainConfig, fit

    x = shapes_images(32, seed=4)

    def batches(start: int):
        step = start
        while True:
            yield {"image": x[torch.arange(step * 8, step * 8 + 8) % 32]}
            step += 1

    cfg = VQConfig(**TINY, restart_unused_steps=2)
    tcfg = dict(lr=3e-3, schedule="constant", weight_decay=0.0, device="cpu", checkpoint_every=6)
    whole = VQModel(cfg)
    fit(whole, batches, TrainConfig(steps=12, **tcfg), tmp_path / "a", vq_meta(cfg), progress=False)
    fit(VQModel(cfg), batches, TrainConfig(steps=6, **tcfg), tmp_path / "b", vq_meta(cfg), progress=False)
    resumed = VQModel(cfg)
    summary = fit(
        resumed, batches, TrainConfig(steps=12, **tcfg), tmp_path / "b", vq_meta(cfg), progress=False
    )
    assert summary["start_step"] == 6
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_load_vq_rejects_other_checkpoints(tmp_path):
    model = VQModel(VQConfig(**TINY))
    save_checkpoint(tmp_path / "gpt", model.state_dict(), {"kind": "gpt", "config": {}})
    with pytest.raises(ValueError, match="expected kind 'vq'"):
        load_vq(tmp_path / "gpt")
    save_checkpoint(
        tmp_path / "bad", model.state_dict(), {"kind": "vq", "config": {**asdict(model.cfg), "x": 1}}
    )
    with pytest.raises(ValueError, match=r"unknown VQConfig keys \['x'\]"):
        load_vq(tmp_path / "bad")


# --- DDP: the codebook update all-reduces statistics and broadcasts restarts ---------------------------


def _ddp_worker(
    rank: int, world: int, port: int, codebook: torch.Tensor, z_all: torch.Tensor, out: dict
) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    q = _initialised_quantizer(codebook.clone(), decay=0.7, restart=1)
    half = z_all.shape[0] // world
    mine = z_all[rank * half : (rank + 1) * half]
    q(mine.t().reshape(1, 2, 1, half).requires_grad_(True))
    q.update(step=5)
    out[rank] = (q.codebook.clone(), q.cluster_size.clone(), q.last_restarted)
    dist.destroy_process_group()


def test_ddp_update_matches_single_process():
    codebook = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [40.0, 40.0]])  # code 3 gets no points
    z_all = torch.tensor(
        [[0.3, 0.1], [5.2, 0.4], [0.1, 4.1], [0.9, 0.2], [4.5, 0.3], [0.2, 4.6], [5.9, 0.1], [0.0, 0.7]]
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, port, codebook, z_all, out), nprocs=2, join=True)
    (c0, n0, r0), (c1, n1, _) = out[0], out[1]
    assert torch.equal(c0, c1) and torch.equal(n0, n1), "ranks must keep identical codebooks"

    single = _initialised_quantizer(codebook.clone(), decay=0.7, restart=1)
    single(z_all.t().reshape(1, 2, 1, 8).requires_grad_(True))
    single.update(step=5)
    # Statistics are summed over ranks exactly as over one big batch (the restarted code 3 aside).
    assert r0 == single.last_restarted == 1
    assert torch.allclose(c0[:3], single.codebook[:3], atol=1e-5)
    assert torch.allclose(n0[:3], single.cluster_size[:3], atol=1e-6)
    # The restarted code comes from rank 0's encoder outputs, broadcast to every rank.
    assert any(torch.equal(c0[3], row) for row in z_all[:4])
