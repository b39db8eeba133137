"""Stage-1 GPT over DiGIT tokens, and the decoder pieces the stage-2 renderer reuses.

Sequence (paper): input [BOS or class embedding, t1 .. tN] -> targets [t1 .. tN, EOS]; with use_eos=False
(the default: the pipeline always wants exactly N tokens) the last input token is dropped instead.
Class-conditional models replace BOS by a class embedding with num_classes + 1 rows; the last row is the
"null" class, used for class dropout in training and for the unconditional branch of classifier-free
guidance. Causal attention through F.scaled_dot_product_attention, a preallocated KV cache.

Two block layouts (`norm`):
  * "pre" (default): pre-LN blocks x + f(ln(x)) and a final LayerNorm, GPT-2 initialisation;
  * "post": the reference's fairseq TransformerDecoder (DiGIT config/stage1/dino_base.yaml with
    fairseq_user/image_generation_stage1/model.py: decoder_normalize_before=False) — post-LN blocks
    ln(x + f(x)) (fairseq/modules/transformer_layer.py), token embeddings scaled by sqrt(d) (fairseq's
    embed_scale, no_scale_embedding=False), no final LayerNorm (fairseq/models/transformer/
    transformer_decoder.py builds it only when normalize_before), and fairseq's initialisation (see
    `init_fairseq`).

Sizes (tested on the meta device, tests/test_presets.py): GPT_SIZES["base"] (16 layers, d 1024, 16 heads,
FFN 4096, untied head, biases) has 219.6M parameters at K=8192 with 1000 classes and 256 tokens — the
paper's 219M. GPT_SIZES["large"] (24 layers, d 1536, 24 heads, FFN 6144) has 732.3M at K=16384, the
codebook the paper pairs with its large model (732M); at K=8192 it has 707M. Post-LN drops the final
LayerNorm (2·d parameters); EOS adds one head row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.checkpoint import load_model
from pipeline.sampling import cfg_combine, process_logits, row_uniforms, sample_with_uniforms

GPT_SIZES: dict[str, dict[str, int]] = {
    # CPU pipeline defaults: ~3M / ~11M block parameters, trainable in minutes on two cores.
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 256, "ffn_dim": 1024},
    "small": {"n_layer": 6, "n_head": 6, "n_embd": 384, "ffn_dim": 1536},
    # The paper's models.
    "base": {"n_layer": 16, "n_head": 16, "n_embd": 1024, "ffn_dim": 4096},
    "large": {"n_layer": 24, "n_head": 24, "n_embd": 1536, "ffn_dim": 6144},
}


@dataclass
class GPTConfig:
    vocab_size: int = 512  # K: DiGIT token ids 0..K-1 (EOS, if used, is id K of the output head)
    block_size: int = 64  # N: image tokens per sequence
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    ffn_dim: int = 1024
    dropout: float = 0.0
    num_classes: int = 0  # 0 = unconditional (BOS); else class embedding with one extra "null" row
    class_dropout: float = 0.0  # training: share of rows whose class becomes "null" (enables CFG)
    label_smoothing: float = 0.0
    bias: bool = True
    use_eos: bool = False  # predict EOS after tN (paper); never sampled
    norm: str = "pre"  # pre | post (the reference's fairseq decoder; see the module docstring)
    attn_dropout: float | None = None  # dropout on attention weights; None = `dropout` (fairseq: 0)

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        check_norm(self.norm, "GPTConfig")
        if self.vocab_size < 2 or self.block_size < 1 or self.num_classes < 0:
            raise ValueError(
                f"GPTConfig: expected vocab_size >= 2, block_size >= 1, num_classes >= 0; got "
                f"{self.vocab_size}, {self.block_size}, {self.num_classes}"
            )
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"GPTConfig.class_dropout must be in [0, 1), got {self.class_dropout}")


def gpt_config(size: str, vocab_size: int, block_size: int, num_classes: int = 0, **overrides) -> GPTConfig:
    """A GPTConfig of a named size (GPT_SIZES), with any field overridden by keyword."""
    if size not in GPT_SIZES:
        raise ValueError(f"unknown GPT size {size!r}; expected one of {sorted(GPT_SIZES)}")
    fields = {
        **GPT_SIZES[size],
        "vocab_size": vocab_size,
        "block_size": block_size,
        "num_classes": num_classes,
    }
    return GPTConfig(**{**fields, **overrides})


# --- decoder pieces shared with the renderer -------------------------------------------------------------

NORMS = ("pre", "post")


def check_norm(norm: str, owner: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"{owner}.norm: expected one of {NORMS}, got {norm!r}")


def embed_scale(norm: str, n_embd: int) -> float:
    """fairseq multiplies token embeddings by sqrt(d) before adding positions; our pre-LN models do not."""
    return math.sqrt(n_embd) if norm == "post" else 1.0


class KVCache:
    """Keys and values of every layer, for up to `max_len` positions, filled left to right.

    A trunk forward over T new positions writes them at [length, length + T) in every layer, then advances
    `length`. Storage is allocated at the first write, with the keys' batch size, dtype and device (so the
    cache also works under autocast).
    """

    def __init__(self, n_layer: int, max_len: int) -> None:
        self.n_layer, self.max_len = n_layer, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, hd] at the current position; return all keys and values so far."""
        B, H, T, D = k.shape
        pos = self.length
        if pos + T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot add {T} at {pos}")
        if self.k is None or self.v is None:
            self.k = k.new_zeros(self.n_layer, B, H, self.max_len, D)
            self.v = v.new_zeros(self.n_layer, B, H, self.max_len, D)
        self.k[layer, :, :, pos : pos + T] = k
        self.v[layer, :, :, pos : pos + T] = v
        return self.k[layer, :, :, : pos + T], self.v[layer, :, :, : pos + T]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; causal unless `causal=False` (the NAR renderer's bidirectional trunk)."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        dropout: float,
        bias: bool,
        attn_dropout: float | None = None,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout if attn_dropout is None else attn_dropout
        self.causal = causal
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, 2)
        )
        p = self.dropout if self.training else 0.0
        if cache is not None and not self.causal:
            raise ValueError("a KV cache needs causal attention (bidirectional attention sees the future)")
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)
        else:
            pos = cache.length
            k, v = cache.update(layer, k, v)
            if pos == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            elif T == 1:  # one new query sees every cached key
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:  # several new queries after a prefix: causal, offset by pos (SDPA's is_causal is top-left)
                mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, ffn_dim: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, ffn_dim, bias=bias)
        self.proj = nn.Linear(ffn_dim, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Transformer block. norm "pre": x + attn(ln(x)), then x + mlp(ln(x)). norm "post" (fairseq with
    normalize_before=False): ln(x + attn(x)), then ln(x + mlp(x))."""

    def __init__(
        self,
        n_embd: int,
        n_head: int,
        ffn_dim: int,
        dropout: float,
        bias: bool,
        norm: str = "pre",
        attn_dropout: float | None = None,
        causal: bool = True,
    ) -> None:
        super().__init__()
        check_norm(norm, "Block")
        self.post = norm == "post"
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, attn_dropout, causal)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, ffn_dim, dropout, bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        if self.post:
            x = self.ln_1(x + self.attn(x, cache, layer))
            return self.ln_2(x + self.mlp(x))
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The decoder trunk (blocks, + a final LayerNorm for pre-LN); models add their embeddings and heads.

    `causal=False` makes every block attend in both directions (the NAR renderer); no KV cache then.
    """

    def __init__(
        self,
        n_layer: int,
        n_head: int,
        n_embd: int,
        ffn_dim: int,
        dropout: float,
        bias: bool,
        norm: str = "pre",
        attn_dropout: float | None = None,
        causal: bool = True,
    ) -> None:
        super().__init__()
        check_norm(norm, "Transformer")
        self.blocks = nn.ModuleList(
            Block(n_embd, n_head, ffn_dim, dropout, bias, norm, attn_dropout, causal) for _ in range(n_layer)
        )
        # post-LN blocks already end in a LayerNorm; fairseq adds no final one (transformer_decoder.py)
        self.ln_f = nn.LayerNorm(n_embd, bias=bias) if norm == "pre" else nn.Identity()

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, hidden: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """[B, T, D] -> normalised [B, T, D]; appends each block's output to `hidden` if given."""
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
            if hidden is not None:
                hidden.append(x)
        if cache is not None:
            cache.length += x.shape[1]
        return self.ln_f(x)

    def new_cache(self, max_len: int) -> KVCache:
        return KVCache(len(self.blocks), max_len)


def init_weights(model: nn.Module, n_layer: int, generator: torch.Generator) -> None:
    """GPT-2 init from an explicit generator: N(0, 0.02), residual output projections scaled by
    1/sqrt(2 * n_layer) so the residual stream's variance does not grow with depth; zero biases."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            if module.weight.is_meta:
                continue
            std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("attn.proj", "mlp.proj")) else 0.02
            nn.init.normal_(module.weight, 0.0, std, generator=generator)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


def init_fairseq(model: nn.Module, generator: torch.Generator) -> None:
    """fairseq's initialisation of a TransformerDecoder, from an explicit generator (used with norm "post"):
    * embeddings (tokens, classes, learned positions) N(0, d^-1/2) — fairseq/models/transformer/
      transformer_base.py Embedding and fairseq/modules/positional_embedding.py;
    * q, k, v projections xavier-uniform with gain 1/sqrt(2) each (our fused qkv is initialised per
      third), the output projection xavier-uniform with a zero bias — fairseq/modules/
      multihead_attention.py reset_parameters; q/k/v biases keep nn.Linear's default;
    * the FFN's fc1/fc2: nn.Linear's default (fairseq/modules/transformer_layer.py build_fc1/fc2);
    * the output projection N(0, d^-1/2), no bias — transformer_decoder.py build_output_projection;
    * LayerNorms: ones and zeros.
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            if not module.weight.is_meta:
                nn.init.normal_(module.weight, 0.0, module.embedding_dim**-0.5, generator=generator)
        elif isinstance(module, nn.Linear) and not module.weight.is_meta:
            fan_in = module.in_features
            if name.endswith("attn.qkv"):
                for chunk in module.weight.data.chunk(3, dim=0):
                    nn.init.xavier_uniform_(chunk, gain=1 / math.sqrt(2), generator=generator)
            elif name.endswith("attn.proj"):
                nn.init.xavier_uniform_(module.weight, generator=generator)
            elif name.split(".")[-1] == "head":
                nn.init.normal_(module.weight, 0.0, fan_in**-0.5, generator=generator)
            else:  # nn.Linear.reset_parameters, drawn from the generator
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            if module.bias is not None:
                if name.endswith("attn.proj"):
                    nn.init.zeros_(module.bias)
                else:
                    nn.init.uniform_(module.bias, -(fan_in**-0.5), fan_in**-0.5, generator=generator)


def init_model(model: nn.Module, norm: str, n_layer: int, generator: torch.Generator) -> None:
    """GPT-2 init for pre-LN models, fairseq's for the post-LN (fairseq-style) decoder."""
    if norm == "post":
        init_fairseq(model, generator)
    else:
        init_weights(model, n_layer, generator)


def autoregress(
    trunk: Transformer,
    prefix: torch.Tensor,
    embed: Callable[[torch.Tensor, int], torch.Tensor],
    head: Callable[[torch.Tensor], torch.Tensor],
    pick: Callable[[torch.Tensor, int], torch.Tensor],
    n_tokens: int,
    use_cache: bool = True,
) -> torch.Tensor:
    """Generate n_tokens ids after `prefix` embeddings [R, T0, D].

    The prefix is prefilled in one trunk call into a KV cache allocated once for the whole sequence; each
    decode step then runs one new position per row. embed(ids [R, t], i) embeds generated tokens i..i+t-1;
    head(hidden [R, D]) gives logits [R, V]; pick(logits, i) returns the chosen ids [B] of step i (R may be a
    multiple of B: CFG runs a conditional and an unconditional copy of every row in the same batch, and both
    are fed the same chosen ids). use_cache=False recomputes the whole sequence at every step (the reference
    the KV cache is tested against).
    """
    R = prefix.shape[0]
    cache = trunk.new_cache(prefix.shape[1] + n_tokens - 1) if use_cache else None
    out: list[torch.Tensor] = []
    h = trunk(prefix, cache)[:, -1]
    for i in range(n_tokens):
        ids = pick(head(h), i)
        out.append(ids)
        if i + 1 == n_tokens:
            break
        if cache is not None:
            h = trunk(embed(ids.repeat(R // ids.shape[0]).unsqueeze(1), i), cache)[:, -1]
        else:
            generated = torch.stack(out, dim=1).repeat(R // ids.shape[0], 1)
            h = trunk(torch.cat([prefix, embed(generated, 0)], dim=1))[:, -1]
    return torch.stack(out, dim=1)


def rowwise(generate_rows: Callable[[slice], torch.Tensor], batch: int) -> torch.Tensor:
    """Run `generate_rows` on one row at a time and stack the results.

    Why: CPU GEMM and SDPA choose different code paths for different batch sizes (a 1-token decode step of
    batch 1, 2 or 3 differs in the last bits from batch 16 here), and a last-bit change can flip a draw. One
    row at a time every row sees the same shapes whatever the batch, so sample i's tokens depend only on
    its generator.
    """
    return torch.cat([generate_rows(slice(b, b + 1)) for b in range(batch)], dim=0)


# --- the stage-1 model -----------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        c = config
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        # Row 0 is BOS for unconditional models; class-conditional ones have a row per class + "null".
        self.cond_emb = nn.Embedding(c.num_classes + 1 if c.num_classes > 0 else 1, c.n_embd)
        self.wpe = nn.Embedding(c.block_size + 1, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.trunk = Transformer(
            c.n_layer, c.n_head, c.n_embd, c.ffn_dim, c.dropout, c.bias, c.norm, c.attn_dropout
        )
        self.head = nn.Linear(c.n_embd, c.vocab_size + int(c.use_eos), bias=False)
        self.embed_scale = embed_scale(c.norm, c.n_embd)
        init_model(self, c.norm, c.n_layer, torch.Generator().manual_seed(seed))

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint_meta(self) -> dict:
        return {"kind": "gpt", "config": asdict(self.config)}

    def _first_ids(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if self.config.num_classes == 0:
            return torch.zeros(batch, dtype=torch.long, device=device)
        if labels is None:
            return torch.full((batch,), self.null_class, dtype=torch.long, device=device)
        if labels.shape != (batch,):
            raise ValueError(f"labels: expected shape ({batch},), got {tuple(labels.shape)}")
        return labels.to(device)

    def _embed_sequence(self, first: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.cond_emb(first).unsqueeze(1), self.wte(tokens)], dim=1)
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        return self.drop(x + self.wpe(torch.arange(x.shape[1], device=x.device)))

    def _check_tokens(self, tokens: torch.Tensor, name: str) -> None:
        c = self.config
        if tokens.dim() != 2 or tokens.shape[1] != c.block_size:
            raise ValueError(
                f"{name}: expected [B, {c.block_size}] token ids, got shape {tuple(tokens.shape)}"
            )
        if tokens.dtype != torch.long:
            raise ValueError(f"{name}: expected int64 token ids, got {tokens.dtype}")
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"{name}: ids must be in [0, {c.vocab_size}), found range [{lo}, {hi}]")

    def training_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """batch {"tokens": [B, N] long, "label": [B] long (class-conditional only)} -> (CE, {"acc"})."""
        c = self.config
        tokens = batch["tokens"]
        self._check_tokens(tokens, "batch['tokens']")
        B = tokens.shape[0]
        if c.num_classes > 0 and "label" not in batch:
            raise ValueError("batch: a class-conditional GPT needs batch['label'] [B]")
        first = self._first_ids(batch.get("label"), B, tokens.device)
        if c.num_classes > 0 and self.training and c.class_dropout > 0:
            dropped = torch.rand(B, device=tokens.device) < c.class_dropout
            first = first.masked_fill(dropped, self.null_class)
        if c.use_eos:
            inputs = tokens
            targets = torch.cat([tokens, tokens.new_full((B, 1), c.vocab_size)], dim=1)
        else:
            inputs, targets = tokens[:, :-1], tokens
        logits = self.head(self.trunk(self._embed_sequence(first, inputs)))
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            label_smoothing=c.label_smoothing,
        )
        acc = (logits.argmax(-1) == targets).float().mean()
        return loss, {"acc": float(acc)}

    @torch.no_grad()
    def forward_features(
        self, tokens: torch.Tensor, labels: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Each block's output [B, N+1, D] over [BOS/class, t1..tN] (for the linear probe).

        labels=None feeds BOS (or the null class): what a linear probe must use, since a class-conditional
        model given the true label would leak it into the features.
        """
        self._check_tokens(tokens, "tokens")
        hidden: list[torch.Tensor] = []
        self.trunk(
            self._embed_sequence(self._first_ids(labels, tokens.shape[0], tokens.device), tokens),
            None,
            hidden,
        )
        return hidden

    @torch.inference_mode()
    def generate(
        self,
        generators: list[torch.Generator],
        *,
        labels: torch.Tensor | None = None,
        n_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 1.0,
        use_cache: bool = True,
        batch_invariant: bool = False,
    ) -> torch.Tensor:
        """Sample token ids [B, n_tokens], row b drawn with generators[b] (B = len(generators)).

        labels [B] (class-conditional models; None = unconditional / null class). cfg_scale != 1 mixes in
        the null-class branch, computed in the same batch: logits = cond + (s - 1) * (cond - uncond).
        temperature 0 = greedy. Every row draws its n_tokens uniforms from its generator before decoding,
        so the generator's stream (continued by the renderer) is the same in every mode. batch_invariant=True
        computes one row at a time, so results do not depend on the batch (see `rowwise`; several times
        slower); the default batches all rows.
        """
        c = self.config
        n_tokens = c.block_size if n_tokens is None else n_tokens
        if not 1 <= n_tokens <= c.block_size:
            raise ValueError(f"n_tokens must be in [1, {c.block_size}], got {n_tokens}")
        B = len(generators)
        if labels is not None and c.num_classes == 0:
            raise ValueError("labels given to an unconditional GPT (num_classes=0)")
        if cfg_scale != 1.0 and (c.num_classes == 0 or labels is None):
            raise ValueError("cfg_scale != 1 needs a class-conditional GPT and labels")
        if batch_invariant and B > 1:
            return rowwise(
                lambda r: self.generate(
                    generators[r],
                    labels=None if labels is None else labels[r],
                    n_tokens=n_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    cfg_scale=cfg_scale,
                    use_cache=use_cache,
                    batch_invariant=False,
                ),
                B,
            )
        was_training = self.training
        self.eval()
        device = self.wte.weight.device
        uniforms = row_uniforms(generators, n_tokens).to(device)
        first = self._first_ids(labels, B, device)
        if cfg_scale != 1.0:
            first = torch.cat([first, torch.full_like(first, self.null_class)])
        prefix = self._embed_sequence(first, first.new_zeros(first.shape[0], 0))

        def embed(ids: torch.Tensor, i: int) -> torch.Tensor:
            # generated token i sits at sequence position i + 1 (position 0 is BOS / class)
            x = self.wte(ids)
            if self.embed_scale != 1.0:
                x = x * self.embed_scale
            return x + self.wpe.weight[i + 1 : i + 1 + ids.shape[1]]

        def pick(logits: torch.Tensor, i: int) -> torch.Tensor:
            logits = logits.float()
            if cfg_scale != 1.0:
                logits = cfg_combine(logits[:B], logits[B:], cfg_scale)
            if c.use_eos:
                logits = logits[:, : c.vocab_size]  # the pipeline needs exactly n_tokens image tokens
            logits = process_logits(logits, temperature, top_k, top_p)
            return sample_with_uniforms(logits, uniforms[:, i], greedy=temperature == 0)

        out = autoregress(self.trunk, prefix, embed, self.head, pick, n_tokens, use_cache)
        self.train(was_training)
        return out


def load_gpt(directory: str | Path, map_location: str = "cpu") -> GPT:
    """A GPT from a checkpoint directory written with `checkpoint_meta()` (safetensors + JSON)."""
    return load_model(directory, "gpt", lambda config: GPT(GPTConfig(**config)), map_location)
