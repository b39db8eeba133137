import itertools
import json
import math
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.live import read_curves
from pipeline.models.gpt import GPT, GPTConfig
from pipeline.train import TrainConfig, TrainingStopped, build_optimizer, fit, lr_at, rank_world

REPO = Path(__file__).resolve().parents[1]
CFG = GPTConfig(vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=32, ffn_dim=64)


def token_batches(num_classes: int = 0, rows: int = 8):
    """Batches as a deterministic function of the step, as the stages make them."""

    def batches(start: int):
        for step in itertools.count(start):
            g = torch.Generator().manual_seed(1000 + step)
            batch = {"tokens": torch.randint(0, CFG.vocab_size, (rows, CFG.block_size), generator=g)}
            if num_classes:
                batch["label"] = torch.randint(0, num_classes, (rows,), generator=g)
            yield batch

    return batches


def test_rank_world_without_a_process_group():
    assert rank_world() == (0, 1)


def test_lr_schedules():
    cos = TrainConfig(steps=110, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_at(cos, s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(cos, 10) == pytest.approx(1.0)
    assert lr_at(cos, 60) == pytest.approx(0.55)  # half way: mid of [0.1, 1]
    assert lr_at(cos, 110) == pytest.approx(0.1)
    const = TrainConfig(steps=10, lr=0.3, schedule="constant")
    assert {lr_at(const, s) for s in range(10)} == {0.3}


class FairseqInverseSqrt:
    """fairseq/optim/lr_scheduler/inverse_square_root_schedule.py (v0.12), transcribed: the lr is set to
    warmup_init_lr at construction and by step_update(num_updates) after every update."""

    def __init__(self, lr: float, warmup_updates: int, warmup_init_lr: float) -> None:
        self.warmup_updates, self.warmup_init_lr = warmup_updates, warmup_init_lr
        self.lr_step = (lr - warmup_init_lr) / warmup_updates
        self.decay_factor = lr * warmup_updates**0.5
        self.lr = warmup_init_lr

    def step_update(self, num_updates: int) -> float:
        if num_updates < self.warmup_updates:
            self.lr = self.warmup_init_lr + num_updates * self.lr_step
        else:
            self.lr = self.decay_factor * num_updates**-0.5
        return self.lr


def test_inverse_sqrt_is_fairseqs_update_for_update():
    # the reference's stage-1 recipe (DiGIT config/stage1/dino_base.yaml)
    cfg = TrainConfig(steps=30000, lr=3e-4, warmup_steps=6250, warmup_init_lr=1e-7, schedule="inverse_sqrt")
    ref = FairseqInverseSqrt(3e-4, 6250, 1e-7)
    used = []  # the lr each update runs with, as fairseq's trainer loop sets it
    for num_updates in range(30000):
        used.append(ref.lr)
        ref.step_update(num_updates + 1)
    ours = [lr_at(cfg, k) for k in range(30000)]
    assert ours == pytest.approx(used, rel=1e-12)
    assert ours[0] == 1e-7 and ours[6250] == pytest.approx(3e-4) and ours[25000] == pytest.approx(1.5e-4)
    # warmup_init_lr defaults to 0 (fairseq's default with warm-up), min_lr_ratio still floors the decay
    floored = TrainConfig(steps=1000, lr=1.0, warmup_steps=100, schedule="inverse_sqrt", min_lr_ratio=0.4)
    assert lr_at(floored, 0) == 0.0 and lr_at(floored, 50) == pytest.approx(0.5)
    assert lr_at(floored, 400) == pytest.approx(0.5) and lr_at(floored, 999) == pytest.approx(0.4)


def test_train_config_validation_messages():
    with pytest.raises(ValueError, match="TrainConfig.schedule: expected one of"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="TrainConfig.amp"):
        TrainConfig(amp="fp16")
    with pytest.raises(ValueError, match="TrainConfig.steps: expected >= 1"):
        TrainConfig(steps=0)
    assert TrainConfig(betas=[0.9, 0.95]).betas == (0.9, 0.95)  # YAML gives lists


def test_weight_decay_only_on_matrices():
    model = GPT(CFG)
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_resume_after_a_kill_is_exact(tmp_path):
    # Dropout and class dropout draw from the torch RNG: the resume must reproduce those draws too.
    cfg = GPTConfig(**{**CFG.__dict__, "dropout": 0.1, "num_classes": 3, "class_dropout": 0.2})
    train = TrainConfig(steps=10, lr=3e-3, warmup_steps=3, checkpoint_every=4, device="cpu", seed=5)
    meta = {"kind": "gpt", "config": cfg.__dict__}

    ref = GPT(cfg, seed=0)
    fit(ref, token_batches(3), train, tmp_path / "ref", meta, tmp_path / "ref_curves", progress=False)

    def killed_at_6(start):
        for step, batch in zip(itertools.count(start), token_batches(3)(start), strict=False):
            if step == 6:
                raise KeyboardInterrupt("killed")
            yield batch

    with pytest.raises(KeyboardInterrupt):
        fit(
            GPT(cfg, seed=0),
            killed_at_6,
            train,
            tmp_path / "run",
            meta,
            tmp_path / "run_curves",
            progress=False,
        )
    assert load_checkpoint(tmp_path / "run" / "last")[1]["step"] == 4
    assert [r["step"] for r in read_curves(tmp_path / "run_curves")] == list(range(6))

    # A fresh process would build the model from its seed again; fit restores everything from run/last.
    resumed = GPT(cfg, seed=123)
    summary = fit(
        resumed, token_batches(3), train, tmp_path / "run", meta, tmp_path / "run_curves", progress=False
    )
    assert (summary["start_step"], summary["steps_run"]) == (4, 6)
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # exact on CPU
    rows, ref_rows = read_curves(tmp_path / "run_curves"), read_curves(tmp_path / "ref_curves")
    assert [r["step"] for r in rows] == list(range(10))  # no duplicates after the resume
    assert [(r["loss"], r["acc"], r["lr"]) for r in rows] == [
        (r["loss"], r["acc"], r["lr"]) for r in ref_rows
    ]
    # dvclive's summary: the last row, as an uninterrupted run's
    summaries = [
        json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("run_curves", "ref_curves")
    ]
    assert [{k: m[k] for k in ("step", "loss", "acc", "lr")} for m in summaries] == [
        {"step": 9, "loss": rows[-1]["loss"], "acc": rows[-1]["acc"], "lr": rows[-1]["lr"]}
    ] * 2

    # Nothing left to do: a rerun returns at once with the saved final loss.
    again = fit(resumed, token_batches(3), train, tmp_path / "run", meta, None, progress=False)
    assert again["steps_run"] == 0 and again["final_loss"] == summary["final_loss"]


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    train = TrainConfig(steps=2, device="cpu")
    fit(GPT(CFG), token_batches(), train, tmp_path, {"kind": "gpt", "config": {"n_layer": 2}}, progress=False)
    with pytest.raises(CheckpointError, match=r"different run — meta\['config'\]"):
        fit(
            GPT(CFG),
            token_batches(),
            train,
            tmp_path,
            {"kind": "gpt", "config": {"n_layer": 3}},
            progress=False,
        )


def test_resume_from_last_old_after_a_kill_between_renames(tmp_path):
    train = TrainConfig(steps=3, checkpoint_every=2, device="cpu")
    fit(GPT(CFG), token_batches(), train, tmp_path, {"kind": "gpt"}, progress=False)
    shutil.move(tmp_path / "last", tmp_path / "last.old")
    summary = fit(GPT(CFG), token_batches(), TrainConfig(steps=5, device="cpu"), tmp_path, {}, progress=False)
    assert summary["start_step"] == 3


class Regression(nn.Module):
    """y = w.x + b; logs its own metric; optional hook to record the steps it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.seen: list[int] = []
        self.stop_at: int | None = None

    def training_loss(self, batch):
        err = self.lin(batch["x"]).squeeze(-1) - batch["y"]
        loss = (err**2).mean()
        return loss, {"mae": float(err.detach().abs().mean())}

    def after_optimizer_step(self, step: int) -> None:
        self.seen.append(step)
        if step == self.stop_at:
            raise TrainingStopped(f"collapsed at step {step}")


def regression_batches(nan_at: int | None = None):
    def batches(start: int):
        for step in itertools.count(start):
            x = torch.randn(16, 4, generator=torch.Generator().manual_seed(step))
            y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
            if step == nan_at:
                x[0, 0] = float("nan")
            yield {"x": x, "y": y}

    return batches


def test_non_finite_loss_stops_with_the_step_and_keeps_weights_clean(tmp_path):
    model = Regression()
    train = TrainConfig(steps=10, lr=1e-2, device="cpu")
    with pytest.raises(TrainingStopped, match=r"non-finite loss \(nan\) at step 3"):
        fit(model, regression_batches(nan_at=3), train, tmp_path, {}, tmp_path / "curves", progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.seen == [0, 1, 2]  # the bad step never reached the optimizer or the hook
    assert [r["step"] for r in read_curves(tmp_path / "curves")] == [0, 1, 2]


def test_hooks_logs_and_stop_from_the_model(tmp_path):
    model = Regression()
    train = TrainConfig(steps=7, lr=5e-2, log_every=3, device="cpu", schedule="constant")
    summary = fit(model, regression_batches(), train, tmp_path, {}, tmp_path / "curves", progress=False)
    assert model.seen == list(range(7))
    rows = read_curves(tmp_path / "curves")
    assert set(rows[0]) == {"step", "loss", "lr", "grad_norm", "items_per_s", "seconds", "mae"}
    assert [r["step"] for r in rows] == [0, 3, 6]  # every log_every steps, and the last one
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert summary["items_per_s"] > 0 and math.isfinite(summary["final_loss"])

    stopper = Regression()
    stopper.stop_at = 2
    with pytest.raises(TrainingStopped, match="collapsed at step 2"):
        fit(
            stopper,
            regression_batches(),
            TrainConfig(steps=5, device="cpu"),
            tmp_path / "b",
            {},
            progress=False,
        )


def test_batches_running_out_and_bf16_autocast(tmp_path):
    short = lambda start: iter([next(regression_batches()(start))])  # noqa: E731
    with pytest.raises(ValueError, match=r"batches\(0\) ran out at step 1"):
        fit(Regression(), short, TrainConfig(steps=3, device="cpu"), tmp_path / "a", {}, progress=False)
    # amp="bf16" runs the forward under CPU bf16 autocast; the weights stay fp32.
    model = GPT(CFG)
    summary = fit(
        model,
        token_batches(),
        TrainConfig(steps=2, amp="bf16", device="cpu"),
        tmp_path / "b",
        {},
        progress=False,
    )
    assert math.isfinite(summary["final_loss"]) and model.wte.weight.dtype == torch.float32


class GradRecorder(GPT):
    """Keeps the (clipped) gradients each optimizer step was taken with."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.grads: list[dict[str, torch.Tensor]] = []

    def after_optimizer_step(self, step: int) -> None:
        self.grads.append({n: p.grad.clone() for n, p in self.named_parameters()})


def test_gradient_accumulation_of_4_micro_batches_equals_one_big_batch(tmp_path):
    # No randomness inside the forward (dropout and class dropout off); label smoothing on: it is a
    # per-token term of a mean, so the accumulated gradient is the big batch's.
    cfg = GPTConfig(**{**CFG.__dict__, "num_classes": 3, "label_smoothing": 0.1, "bias": False})
    runs = {}
    for accum in (1, 4):
        model = GradRecorder(cfg, seed=0)
        # fp32: amp "auto" takes bf16 on CPUs with native bf16, whose rounding depends on the micro-batch shape
        train = TrainConfig(
            steps=3, lr=1e-3, warmup_steps=1, device="cpu", accum_steps=accum, grad_clip=0.5, amp="off"
        )
        curves = tmp_path / f"a{accum}_curves"
        fit(model, token_batches(3, rows=16), train, tmp_path / f"a{accum}", {}, curves, progress=False)
        runs[accum] = (model, read_curves(curves))
    (big, big_rows), (acc, acc_rows) = runs[1], runs[4]
    # the first step starts from the same weights: same gradient up to float summation order (and clipping)
    for name, g in big.grads[0].items():
        assert torch.allclose(acc.grads[0][name], g, rtol=1e-5, atol=1e-8), name
    for a, b in zip(acc_rows, big_rows, strict=True):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["grad_norm"]) == pytest.approx(float(b["grad_norm"]), rel=1e-4)
        assert float(a["acc"]) == pytest.approx(float(b["acc"]), abs=1e-6)
    worst = max((p - q).abs().max().item() for p, q in zip(acc.parameters(), big.parameters(), strict=True))
    assert worst < 1e-5, worst  # vs lr 1e-3: every coordinate moved the same way
    # a batch that does not split evenly is refused before any work
    with pytest.raises(ValueError, match="a batch of 10 rows .* does not split into 4 equal micro-batches"):
        fit(
            GPT(cfg),
            token_batches(3, rows=10),
            TrainConfig(steps=1, device="cpu", accum_steps=4),
            tmp_path / "odd",
            {},
            progress=False,
        )


def test_micro_batches_reseed_per_global_micro_index(tmp_path):
    # With dropout, micro-batch m of rank r draws from derive_seed(seed, step, r * A + m): two micro-batches
    # of 8 rows in one process see the masks two ranks of 8 rows would see (tested under DDP below), and
    # accum_steps = 1 keeps the seed of before.
    from pipeline.sampling import derive_seed
    from pipeline.train import accumulate_gradients

    seeds: list[int] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def forward(self, batch):
            seeds.append(torch.initial_seed())
            return (self.w * batch["x"]).mean(), {}

    batch = {"x": torch.arange(8.0)}
    accumulate_gradients(
        Probe(), batch, 4, lambda m: derive_seed(5, 2, 3 * 4 + m), False, torch.device("cpu")
    )
    assert seeds == [derive_seed(5, 2, 12 + m) for m in range(4)]


DDP_SCRIPT = textwrap.dedent(
    """
    import itertools, sys
    from pathlib import Path
    import torch
    from pipeline.models.gpt import GPT, GPTConfig
    from pipeline.train import TrainConfig, fit, rank_world

    GLOBAL_BATCH = 8

    def main(run_dir, accum=1, dropout=0.0):
        run_dir = Path(run_dir)
        rank, world = rank_world()
        # bias=False: the attention key bias has an identically zero gradient, so its Adam update is
        # rounding noise / eps, which differs between any two summation orders (up to ~2e-5 here).
        cfg = GPTConfig(
            vocab_size=32, block_size=8, n_layer=2, n_head=2, n_embd=32, ffn_dim=64, num_classes=4, bias=False,
            dropout=dropout, class_dropout=dropout,
        )
        model = GPT(cfg, seed=rank)  # different inits on purpose: DDP starts every rank from rank 0's

        def batches(start):
            per = GLOBAL_BATCH // world
            for step in itertools.count(start):
                g = torch.Generator().manual_seed(step)
                tokens = torch.randint(0, 32, (GLOBAL_BATCH, 8), generator=g)
                labels = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
                rows = slice(rank * per, (rank + 1) * per)
                yield {"tokens": tokens[rows], "label": labels[rows]}

        # amp off: bf16 autocast (amp "auto" on CPUs with native bf16) rounds per-rank shapes differently
        train = TrainConfig(
            steps=5, lr=1e-2, warmup_steps=2, device="cpu", checkpoint_every=3, accum_steps=accum, amp="off"
        )
        return fit(model, batches, train, run_dir, {"kind": "gpt"}, run_dir / "curves", progress=False)

    if __name__ == "__main__":
        main(sys.argv[1], *(float(a) if "." in a else int(a) for a in sys.argv[2:]))
    """
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    # Many tiny ops: on the shared 2-core test machine two torch threads that spin-wait for each other ran
    # these tests ~5x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = runpy.run_path(str(script))["main"](tmp_path / "single")
    assert single["world_size"] == 1
    ddp_state, ddp_meta, _ = load_checkpoint(tmp_path / "ddp" / "last")
    one_state, _, _ = load_checkpoint(tmp_path / "single" / "last")
    assert ddp_meta["step"] == 5
    # Same global batch, gradients averaged over the two ranks: equal up to float summation order, which
    # Adam's per-coordinate normalisation amplifies for near-zero gradients (measured 6e-6 after 5 steps at
    # lr 1e-2). Ranks that did not sync would differ by ~lr.
    worst = max((ddp_state[k] - one_state[k]).abs().max().item() for k in one_state)
    assert worst < 5e-5, worst
    ddp_rows, one_rows = read_curves(tmp_path / "ddp" / "curves"), read_curves(tmp_path / "single" / "curves")
    assert [r["step"] for r in ddp_rows] == [0, 1, 2, 3, 4]  # rank 0 alone writes the log
    for a, b in zip(ddp_rows, one_rows, strict=True):
        # Loss and model logs (accuracy) are averaged over the ranks' halves: the global batch's values.
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
        assert float(a["acc"]) == pytest.approx(float(b["acc"]), abs=1e-6)
        assert float(a["items_per_s"]) > 0


@pytest.mark.slow
def test_ddp_with_accumulation_matches_one_process_draw_for_draw(tmp_path):
    # 2 ranks x 2 micro-batches of 2 rows vs 1 process x 4 micro-batches of 2 rows, with dropout and class
    # dropout on: the micro-batch of global index r * A + m is seeded alike in both, DDP all-reduces once
    # (the first micro-batch runs under no_sync), so the runs agree up to summation order.
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path / "ddp"), "2", "0.2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    main = runpy.run_path(str(script))["main"]
    main(tmp_path / "single", 4, 0.2)
    main(tmp_path / "big", 1, 0.2)  # one pass over the 8 rows: other dropout masks
    ddp_state = load_checkpoint(tmp_path / "ddp" / "last")[0]
    one_state = load_checkpoint(tmp_path / "single" / "last")[0]
    big_state = load_checkpoint(tmp_path / "big" / "last")[0]
    worst = max((ddp_state[k] - one_state[k]).abs().max().item() for k in one_state)
    assert worst < 5e-5, worst
    assert max((big_state[k] - one_state[k]).abs().max().item() for k in one_state) > 1e-3
    for a, b in zip(
        read_curves(tmp_path / "ddp" / "curves"), read_curves(tmp_path / "single" / "curves"), strict=True
    ):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)


def test_amp_auto_takes_bf16_only_where_it_is_native():
    from pipeline.train import use_bf16

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_bf16("off", cpu) and not use_bf16("off", cuda)
    assert use_bf16("bf16", cpu) and use_bf16("auto", cuda)
    # on the CPU, auto follows oneDNN's native bf16 support (emulated bf16 is many times slower than fp32)
    assert use_bf16("auto", cpu) == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
