import itertools
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from pipeline.checkpoint import save_checkpoint
from pipeline.models.gpt import GPT, GPT_SIZES, GPTConfig, gpt_config, load_gpt
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


def small_config(**over) -> GPTConfig:
    fields = {"vocab_size": 40, "block_size": 10, "n_layer": 2, "n_head": 2, "n_embd": 32, "ffn_dim": 64}
    return GPTConfig(**{**fields, **over})


def random_tokens(b: int, cfg: GPTConfig, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, cfg.vocab_size, (b, cfg.block_size), generator=torch.Generator().manual_seed(seed)
    )


def test_paper_sizes_have_the_papers_parameter_counts():
    with torch.device("meta"):
        base = GPT(gpt_config("base", vocab_size=8192, block_size=256, num_classes=1000))
        # The paper's large model uses its large tokenizer, K = 16384.
        large = GPT(gpt_config("large", vocab_size=16384, block_size=256, num_classes=1000))
    assert base.wte.weight.is_meta
    assert abs(base.num_params() / 219e6 - 1) < 0.02, base.num_params()
    assert abs(large.num_params() / 732e6 - 1) < 0.03, large.num_params()
    assert (base.config.n_layer, base.config.n_embd, base.config.n_head, base.config.ffn_dim) == (
        16,
        1024,
        16,
        4096,
    )


def test_size_registry_and_overrides():
    assert {"tiny", "small", "base", "large"} <= set(GPT_SIZES)
    cfg = gpt_config("tiny", vocab_size=256, block_size=64, num_classes=10, dropout=0.1)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.num_classes, cfg.dropout) == (4, 256, 256, 10, 0.1)
    with pytest.raises(ValueError, match="unknown GPT size 'huge'"):
        gpt_config("huge", 10, 10)
    with pytest.raises(ValueError, match="not divisible by n_head"):
        small_config(n_embd=30, n_head=4)


def test_training_loss_is_cross_entropy_of_next_tokens():
    cfg = small_config()
    model = GPT(cfg).eval()
    tokens = random_tokens(3, cfg)
    loss, logs = model.training_loss({"tokens": tokens})
    # Recompute from the features' last layer: position j predicts token j (BOS at position 0).
    hidden = model.trunk(model._embed_sequence(torch.zeros(3, dtype=torch.long), tokens[:, :-1]))
    logits = model.head(hidden)
    assert torch.allclose(
        loss, F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tokens.reshape(-1)), atol=1e-6
    )
    assert 0.0 <= logs["acc"] <= 1.0
    # A random init predicts roughly uniformly.
    assert abs(loss.item() - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.5


def test_label_smoothing_and_eos():
    cfg = small_config(label_smoothing=0.1, use_eos=True)
    model = GPT(cfg).eval()
    tokens = random_tokens(2, cfg)
    loss, _ = model.training_loss({"tokens": tokens})
    logits = model.head(model.trunk(model._embed_sequence(torch.zeros(2, dtype=torch.long), tokens)))
    assert logits.shape == (2, cfg.block_size + 1, cfg.vocab_size + 1)  # EOS is an output id
    targets = torch.cat([tokens, torch.full((2, 1), cfg.vocab_size)], dim=1)
    ref = F.cross_entropy(logits.reshape(-1, cfg.vocab_size + 1), targets.reshape(-1), label_smoothing=0.1)
    assert torch.allclose(loss, ref, atol=1e-6)
    # EOS is never sampled: exactly block_size image tokens come out.
    out = model.generate(sample_generators(0, range(3)), temperature=2.0)
    assert out.shape == (3, cfg.block_size) and int(out.max()) < cfg.vocab_size


def test_bad_batches_are_rejected_with_clear_messages():
    cfg = small_config(num_classes=4)
    model = GPT(cfg)
    with pytest.raises(ValueError, match=r"expected \[B, 10\] token ids"):
        model.training_loss(
            {"tokens": torch.zeros(2, 7, dtype=torch.long), "label": torch.zeros(2, dtype=torch.long)}
        )
    with pytest.raises(ValueError, match=r"ids must be in \[0, 40\), found range \[0, 40\]"):
        bad = torch.full((2, 10), 40)
        bad[0, 0] = 0
        model.training_loss({"tokens": bad, "label": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(ValueError, match="needs batch\\['label'\\]"):
        model.training_loss({"tokens": torch.zeros(2, 10, dtype=torch.long)})
    with pytest.raises(ValueError, match="cfg_scale"):
        GPT(small_config()).generate(sample_generators(0, range(2)), cfg_scale=2.0)


def test_forward_features_shapes_and_causality():
    cfg = small_config(num_classes=3)
    model = GPT(cfg).eval()
    tokens = random_tokens(2, cfg)
    feats = model.forward_features(tokens)
    assert len(feats) == cfg.n_layer
    assert all(f.shape == (2, cfg.block_size + 1, cfg.n_embd) for f in feats)
    # labels=None is the null class.
    null = model.forward_features(tokens, torch.full((2,), 3))
    assert all(torch.equal(a, b) for a, b in zip(feats, null, strict=True))
    # Changing token j (input position j + 1) leaves positions <= j untouched and changes position j + 1.
    j = 4
    changed = tokens.clone()
    changed[:, j] = (changed[:, j] + 1) % cfg.vocab_size
    after = model.forward_features(changed)[-1]
    assert torch.equal(after[:, : j + 1], feats[-1][:, : j + 1])
    assert not torch.allclose(after[:, j + 1], feats[-1][:, j + 1])


def test_class_dropout_replaces_labels_by_the_null_class():
    cfg = small_config(num_classes=5, class_dropout=0.5)
    model = GPT(cfg)
    tokens, labels = random_tokens(8, cfg), torch.arange(8) % 5
    torch.manual_seed(3)
    loss_train, _ = model.train().training_loss({"tokens": tokens, "label": labels})
    torch.manual_seed(3)
    dropped = torch.rand(8) < 0.5
    assert 0 < int(dropped.sum()) < 8
    expected, _ = model.eval().training_loss({"tokens": tokens, "label": labels.masked_fill(dropped, 5)})
    unchanged, _ = model.training_loss({"tokens": tokens, "label": labels})
    assert torch.equal(loss_train, expected)
    assert not torch.equal(loss_train, unchanged)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_kv_cache_matches_full_forward_on_every_path(norm):
    cfg = small_config(norm=norm)
    model = GPT(cfg).eval()
    tokens = random_tokens(2, cfg)
    x = model._embed_sequence(torch.zeros(2, dtype=torch.long), tokens)
    full = model.trunk(x)
    cache = model.trunk.new_cache(x.shape[1])
    pieces = [model.trunk(x[:, :4], cache)]  # prefill (causal from position 0)
    pieces += [model.trunk(x[:, 4:5], cache)]  # one token
    pieces += [model.trunk(x[:, 5:], cache)]  # several tokens after a prefix (offset causal mask)
    assert cache.length == x.shape[1]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="KV cache holds"):
        model.trunk(x[:, :1], cache)


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("num_classes,cfg_scale", [(0, 1.0), (4, 1.0), (4, 3.0)])
def test_kv_cache_generation_equals_full_recompute(num_classes, cfg_scale, norm):
    model = GPT(small_config(num_classes=num_classes, norm=norm, use_eos=norm == "post"), seed=1)
    labels = torch.tensor([0, 3, 1]) if num_classes else None
    kw = {"labels": labels, "top_k": 30, "top_p": 0.9, "cfg_scale": cfg_scale}
    fast = model.generate(sample_generators(7, range(3)), use_cache=True, **kw)
    slow = model.generate(sample_generators(7, range(3)), use_cache=False, **kw)
    assert fast.shape == (3, 10)
    assert torch.equal(fast, slow)
    # Also in one batch (the path a GPU run takes with batch_invariant=False).
    fast_b = model.generate(sample_generators(7, range(3)), use_cache=True, batch_invariant=False, **kw)
    slow_b = model.generate(sample_generators(7, range(3)), use_cache=False, batch_invariant=False, **kw)
    assert torch.equal(fast_b, slow_b)


def test_cfg_scale_one_equals_plain_conditional_sampling():
    model = GPT(small_config(num_classes=4), seed=1)
    labels = torch.tensor([1, 2])
    plain = model.generate(sample_generators(0, range(2)), labels=labels)
    assert torch.equal(model.generate(sample_generators(0, range(2)), labels=labels, cfg_scale=1.0), plain)
    # Guidance does change the samples (the null class is a different condition).
    guided = model.generate(sample_generators(0, range(2)), labels=labels, cfg_scale=8.0)
    assert not torch.equal(guided, plain)


def test_greedy_generation_follows_the_argmax_chain():
    cfg = small_config()
    model = GPT(cfg, seed=2).eval()
    out = model.generate(sample_generators(0, range(2)), temperature=0.0, n_tokens=5)
    assert out.shape == (2, 5)
    seq = torch.zeros(2, 0, dtype=torch.long)
    for _ in range(5):
        h = model.trunk(model._embed_sequence(torch.zeros(2, dtype=torch.long), seq))
        seq = torch.cat([seq, model.head(h[:, -1]).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_post_ln_is_the_fairseq_decoder():
    cfg = small_config(norm="post", num_classes=3)
    model = GPT(cfg, seed=0).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith("trunk.ln_f") for n in names)  # no final LayerNorm
    assert model.num_params() == GPT(small_config(num_classes=3)).num_params() - 2 * cfg.n_embd
    # token (and class) embeddings are scaled by sqrt(d) before the positions are added
    tokens = random_tokens(2, cfg)
    first = torch.tensor([0, 2])
    x = model._embed_sequence(first, tokens)
    by_hand = torch.cat([model.cond_emb(first)[:, None], model.wte(tokens)], 1) * math.sqrt(cfg.n_embd)
    assert torch.allclose(x, by_hand + model.wpe.weight[: cfg.block_size + 1], atol=1e-6)
    # a block is ln(x + attn(x)), then ln(x + mlp(x))
    block = model.trunk.blocks[0]
    h = block.ln_1(x + block.attn(x))
    assert torch.allclose(block(x), block.ln_2(h + block.mlp(h)), atol=1e-6)
    # fairseq's initialisation: embeddings and the output projection N(0, d^-1/2), zero attention out bias,
    # q/k/v xavier-uniform with gain 1/sqrt(2) (bound sqrt(3 / (2d)) for a d x d block)
    d = cfg.n_embd
    assert model.wte.weight.std().item() == pytest.approx(d**-0.5, rel=0.1)
    assert model.head.weight.std().item() == pytest.approx(d**-0.5, rel=0.1)
    assert torch.equal(block.attn.proj.bias, torch.zeros(d))
    assert block.attn.qkv.weight.abs().max().item() <= math.sqrt(3 / (2 * d)) + 1e-7
    assert block.attn.qkv.weight.abs().max().item() > 0.9 * math.sqrt(3 / (2 * d))
    with pytest.raises(ValueError, match="GPTConfig.norm: expected one of"):
        small_config(norm="sandwich")


def test_attention_dropout_is_its_own_knob():
    model = GPT(small_config(dropout=0.1, attn_dropout=0.0))
    assert {b.attn.dropout for b in model.trunk.blocks} == {0.0}
    assert {b.attn.resid_drop.p for b in model.trunk.blocks} == {0.1}
    assert {b.attn.dropout for b in GPT(small_config(dropout=0.1)).trunk.blocks} == {0.1}


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_tiny_gpt_overfits_one_batch(tmp_path, norm):
    cfg = small_config(num_classes=8, norm=norm)
    model = GPT(cfg, seed=0)
    batch = {"tokens": random_tokens(8, cfg, seed=1), "label": torch.arange(8)}
    start, _ = model.training_loss(batch)
    train = TrainConfig(
        steps=150, lr=3e-3, warmup_steps=10, weight_decay=0.0, device="cpu", checkpoint_every=1000
    )
    summary = fit(
        model, lambda s: itertools.repeat(batch), train, tmp_path / "run", {"kind": "gpt"}, progress=False
    )
    assert summary["final_loss"] < 0.1 * start.item(), (start.item(), summary)
    # One label per row: the class token identifies the sequence, so greedy decoding replays it.
    _, logs = model.eval().training_loss(batch)
    assert logs["acc"] > 0.95
    replay = model.generate(sample_generators(0, range(8)), labels=batch["label"], temperature=0.0)
    assert (replay == batch["tokens"]).float().mean() > 0.95


def test_checkpoint_roundtrip_gives_the_same_samples(tmp_path):
    model = GPT(small_config(num_classes=3), seed=4)
    save_checkpoint(tmp_path / "gpt", model.state_dict(), model.checkpoint_meta())
    loaded = load_gpt(tmp_path / "gpt")
    assert asdict(loaded.config) == asdict(model.config)
    labels = torch.tensor([0, 2])
    assert torch.equal(
        loaded.generate(sample_generators(1, range(2)), labels=labels),
        model.generate(sample_generators(1, range(2)), labels=labels),
    )


def test_generation_under_bf16_autocast():
    # The KV cache takes the dtype of the keys it stores (bf16 here), not of the embeddings (fp32).
    model = GPT(small_config(num_classes=2), seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(sample_generators(0, range(2)), labels=torch.tensor([0, 1]), cfg_scale=2.0)
    assert out.shape == (2, 10) and int(out.min()) >= 0 and int(out.max()) < 40
