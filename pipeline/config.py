"""Typed schema of params.yaml: one model per section, validated before any stage does work.

Every field has the default shipped in params.yaml, so tests can build tiny configs by overriding a few
keys. Unknown keys, wrong types and out-of-range values raise `ParamsError` naming the key path, the
bad value and what was expected.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from pipeline.ssl.config import SSLConfig


class ParamsError(ValueError):
    """A params file that does not match the schema; the message names every offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Base(Section):
    seed: int = Field(0, ge=0, description="root seed; every stage derives its own seeds from it")
    image_size: int = Field(64, ge=16, le=1024, description="side of the square RGB images in the shards")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available")
    threads: int = Field(0, ge=0, description="torch CPU threads per stage; 0 = torch's default (all cores)")
    num_classes: int = Field(
        10, ge=2, le=12, description="classes of the built-in data (ignored for imagefolder)"
    )


class Prepare(Section):
    source: Literal["builtin", "imagefolder"] = "builtin"
    root: str | None = Field(
        None, description="ImageFolder root: <root>/<class>/<image> or <root>/{train,val}/..."
    )
    train_size: int = Field(4000, ge=1, description="built-in data: number of train images")
    val_size: int = Field(1000, ge=1, description="built-in data: number of val images")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="imagefolder without train/val dirs")
    shard_size: int = Field(1000, ge=1, description="images per WebDataset shard")
    workers: int = Field(1, ge=1, le=64, description="processes used to write shards")

    @model_validator(mode="after")
    def _root_for_imagefolder(self) -> Prepare:
        if self.source == "imagefolder" and not self.root:
            raise ValueError("source 'imagefolder' needs prepare.root (a directory of <class>/<image> files)")
        return self


WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # encoder.weights files (source file)


class Encoder(Section):
    """The tokenizer's feature encoder (shared by extract, tokenize and the stability metric)."""

    # The default is the project's published encoder (published/MODEL_CARD.md): pretrain_encoder's recipe,
    # trained longer than the demo's budget; source ssl trains one in the DAG instead.
    source: Literal["ssl", "timm", "file", "random"] = "file"
    name: str | None = Field(
        None,
        description="timm architecture for timm/file/random (ssl, or file with a directory: from its config)",
    )
    weights: str | None = Field(
        "published/encoder",
        description="ssl: checkpoint dir (models/encoder); file: .pth/.safetensors, or an encoder checkpoint dir",
    )
    layer: int = Field(
        -3, description="block whose output (through the final norm) is used; -3 = third from last"
    )
    img_size: int | None = Field(None, ge=14, description="encoder input size (None: base.image_size)")
    mean: tuple[float, float, float] | None = Field(None, description="None: the weights' own normalisation")
    std: tuple[float, float, float] | None = None
    seed: int = Field(0, ge=0, description="init seed for source 'random' (tests only)")

    @model_validator(mode="after")
    def _needs(self) -> Encoder:
        if self.source in ("ssl", "file") and not self.weights:
            raise ValueError(f"source '{self.source}' needs encoder.weights (a path)")
        weights_file = Path(self.weights or "").suffix in WEIGHT_SUFFIXES
        if not self.name and (self.source in ("timm", "random") or self.source == "file" and weights_file):
            raise ValueError(f"source '{self.source}' needs encoder.name (a timm architecture)")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"encoder.std must be positive, got {self.std}")
        return self


class Crop(Section):
    """A random resized crop + flip of the stored (square) image, resized back to base.image_size."""

    scale: tuple[float, float] = Field((0.8, 1.0), description="area of the crop as a fraction of the image")
    ratio: tuple[float, float] = Field((1.0, 1.0), description="aspect ratio (w / h) range of the crop")
    flip: bool = Field(True, description="horizontal flip with probability 1/2")

    @model_validator(mode="after")
    def _ranges(self) -> Crop:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {list(self.scale)}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {list(self.ratio)}")
        return self


def _check_workers(workers: int | str) -> None:
    if isinstance(workers, int) and workers < 0:
        raise ValueError(f"workers must be >= 0 or 'auto', got {workers}")


class Extract(Section):
    """The K-Means input: patch features of a seeded sample of train images, each as one K-Means view."""

    batch_size: int = Field(256, ge=1, description="images per encoder forward")
    sample: int | float = Field(
        0.25, description="train images stored: a fraction in (0, 1] (float) or a count >= 1 (int)"
    )
    seed: int = Field(0, ge=0, description="which images are sampled, and each image's crop")
    view: Literal["random", "center"] = Field(
        "random", description="random: `crop` (random resized crop + flip); center: the stored image as is"
    )
    crop: Crop = Crop()
    chunk_images: int = Field(
        1000, ge=1, description="at most this many images per Zarr chunk (= per resumable job), balanced"
    )
    workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader processes decoding PNGs; auto: 0 (in the main process) on CPU, min(8, cores) on CUDA",
    )

    @model_validator(mode="after")
    def _sample(self) -> Extract:
        _check_workers(self.workers)
        if isinstance(self.sample, float) and not 0 < self.sample <= 1:
            raise ValueError(f"sample: a fraction must lie in (0, 1], got {self.sample}")
        if isinstance(self.sample, int) and self.sample < 1:
            raise ValueError(f"sample: a count of images must be >= 1, got {self.sample}")
        return self


class KMeans(Section):
    k: int = Field(256, ge=2, le=65535, description="codebook size (tokens are stored as uint16)")
    niter: int = Field(20, ge=1, description="Lloyd iterations (paper: 20)")
    seed: int = Field(0, ge=0)
    max_points_per_centroid: int = Field(256, ge=1, description="faiss subsamples to K × this many points")
    sample_patches: int = Field(65536, ge=1, description="train patches read from the feature store")
    gpu: Literal["auto", "on", "off"] = "auto"
    centroids: str | None = Field(
        None,
        description="a [K, D] .npy of given centroids (e.g. the authors' km_8k.npy): K-Means is skipped, the "
        "usage statistics are still computed on the sample; K must equal k and D the encoder's",
    )


class Tokenize(Section):
    """Tokens of V views of every image: view 0 = the stored (centre) image, views 1..V-1 = `crop`."""

    batch_size: int = Field(256, ge=1, description="images per encoder / VQ forward")
    views: int = Field(1, ge=1, le=64, description="V: token views per image (view 0 = the centre image)")
    seed: int = Field(0, ge=0, description="the crops of views 1..V-1, seeded by (seed, image, view)")
    crop: Crop = Crop()
    workers: int | Literal["auto"] = Field(
        "auto",
        description="DataLoader processes decoding PNGs; auto: 0 (in the main process) on CPU, min(8, cores) on CUDA",
    )

    @model_validator(mode="after")
    def _workers(self) -> Tokenize:
        _check_workers(self.workers)
        return self


class Train(Section):
    """Optimisation knobs shared by every trained model (see pipeline/train.py)."""

    steps: int = Field(1000, ge=1)
    batch_size: int = Field(64, ge=1, description="global batch (split over torchrun processes)")
    accum_steps: int = Field(
        1,
        ge=1,
        description="micro-batches per optimizer step: each process runs batch_size / (processes × "
        "accum_steps) rows at a time; the same global batch, hence the same training (pipeline/train.py)",
    )
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    warmup_init_lr: float = Field(0.0, ge=0, description="inverse_sqrt: lr of step 0 (fairseq)")
    schedule: Literal["cosine", "inverse_sqrt", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 = off")
    checkpoint_every: int = Field(200, ge=1, description="steps between resumable checkpoints")
    log_every: int = Field(10, ge=1, description="steps between rows of the training-curve TSV")
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto", description="auto: bf16 autocast on CUDA and on CPUs with native bf16 (pipeline/train.py)"
    )
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _warmup(self) -> Train:
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < steps ({self.steps})")
        if self.batch_size % self.accum_steps:
            raise ValueError(
                f"batch_size ({self.batch_size}) is not divisible by accum_steps ({self.accum_steps})"
            )
        return self


def _train(**defaults: Any) -> Any:
    return Field(default_factory=lambda: Train(**defaults))


class TrainVQ(Section):
    """The pixel VQ tokenizer: trained here, or a pretrained taming/MAGE VQGAN checkpoint."""

    vqgan: str | None = Field(
        None, description="taming/MAGE VQGAN (.ckpt/.safetensors) to use instead of training"
    )
    channels: int = Field(64, ge=8)
    channel_mult: tuple[int, ...] = (1, 2)
    stem: int = Field(4, ge=1, description="pixels folded into channels before the first conv (per side)")
    num_res_blocks: int = Field(1, ge=0)
    codebook_size: int = Field(512, ge=2, le=65535)
    codebook_dim: int = Field(32, ge=1)
    beta: float = Field(0.25, ge=0, description="commitment weight")
    ema_decay: float = Field(0.95, gt=0, lt=1)
    restart_unused_steps: int = Field(10, ge=0, description="restart codes unused this many steps (0: never)")
    rec_loss: Literal["mse", "l1"] = "mse"
    train: Train = _train(steps=400, batch_size=16, lr=2e-3, warmup_steps=20, weight_decay=0.0, log_every=10)


class ModelSize(Section):
    """A named transformer size (tiny | small | base | large, see pipeline/models/gpt.py) with overrides."""

    size: Literal["tiny", "small", "base", "large"] = "tiny"
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    n_embd: int | None = Field(None, ge=8)
    ffn_dim: int | None = Field(None, ge=8)
    dropout: float = Field(0.1, ge=0, lt=1)
    attn_dropout: float | None = Field(None, ge=0, lt=1, description="on attention weights; None = dropout")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    norm: Literal["pre", "post"] = Field(
        "pre",
        description="pre-LN, or post: the reference's fairseq decoder (post-LN, √d embeddings, no final LN)",
    )

    def overrides(self) -> dict[str, Any]:
        keys = ("n_layer", "n_head", "n_embd", "ffn_dim")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        return {
            **out,
            "dropout": self.dropout,
            "attn_dropout": self.attn_dropout,
            "label_smoothing": self.label_smoothing,
            "norm": self.norm,
        }


class GPTModel(ModelSize):
    class_conditional: bool = True
    class_dropout: float = Field(
        0.1, ge=0, lt=1, description="share of rows trained unconditionally (for CFG)"
    )
    use_eos: bool = Field(False, description="also predict EOS after the last token (the reference's target)")

    def overrides(self) -> dict[str, Any]:
        return {**super().overrides(), "use_eos": self.use_eos}


def _merged(section: BaseModel, changes: dict[str, Any], where: str) -> Any:
    """`section` with the keys of `changes` replaced, validated as the same type (errors name `where`)."""
    try:
        return type(section).model_validate({**section.model_dump(), **changes})
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'section'}: {x['msg']}" for x in e.errors())
        raise ValueError(f"{where}: {problems}") from None


class TrainGPT(Section):
    """Stage-1 GPT, trained on DiGIT tokens and, as the baseline, on VQ tokens: the same settings, except the
    keys given in vq_model / vq_train (the paper's VQ-AR baseline is unconditional and pre-LN)."""

    # No dropout on the demo (the presets set the reference's 0.1): 700 steps without it reach the val loss of
    # 800 steps with 0.1 (2.42 on DiGIT tokens) in 10% less time.
    model: GPTModel = GPTModel(n_embd=192, n_head=4, ffn_dim=768, dropout=0.0)
    train: Train = _train(steps=700, batch_size=32, lr=2e-3, warmup_steps=30, weight_decay=0.01)
    vq_model: dict[str, Any] = Field(
        default_factory=dict, description="keys of train_gpt.model that differ for variant vq"
    )
    vq_train: dict[str, Any] = Field(
        default_factory=dict, description="keys of train_gpt.train that differ for variant vq"
    )

    @model_validator(mode="after")
    def _variant_overrides(self) -> TrainGPT:
        # the vq variant's merged sections must validate too, before any work
        self.model_for("vq")
        self.train_for("vq")
        return self

    def model_for(self, variant: str) -> GPTModel:
        return _merged(self.model, self.vq_model, "train_gpt.vq_model") if variant == "vq" else self.model

    def train_for(self, variant: str) -> Train:
        return _merged(self.train, self.vq_train, "train_gpt.vq_train") if variant == "vq" else self.train


class RendererModel(ModelSize):
    kind: Literal["ar", "nar"] = Field(
        "ar",
        description="ar: autoregressive (models/renderer.py); nar: MaskGIT-style (models/nar_renderer.py)",
    )
    aligned: bool = Field(
        True, description="also give each VQ input the DiGIT token at its image location (models/renderer.py)"
    )
    digit_merge: int = Field(
        1,
        ge=1,
        description="ar only: each m×m block of DiGIT tokens is one prefix position (a DiGIT grid m times finer "
        "than the VQ's at the VQ grid's cost; models/renderer.py)",
    )

    @model_validator(mode="after")
    def _merge_is_ar(self) -> RendererModel:
        if self.digit_merge > 1 and self.kind != "ar":
            raise ValueError(f"digit_merge {self.digit_merge} needs kind ar (the NAR renderer has no merge)")
        return self


class TrainRenderer(Section):
    """Stage-2 renderer: true DiGIT tokens of an image → its VQ tokens."""

    # No dropout on the demo: the renderer underfits its 600 steps (dropout 0.1 gave a higher val loss and a
    # worse upper bound, and cost 15% more time); the presets set the reference's 0.1.
    model: RendererModel = RendererModel(n_embd=192, n_head=4, ffn_dim=768, dropout=0.0)
    train: Train = _train(steps=600, batch_size=32, lr=2e-3, warmup_steps=30, weight_decay=0.01)


class Sampler(Section):
    temperature: float = Field(1.0, ge=0, description="0 = greedy")
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)


class GPTSampler(Sampler):
    cfg_scale: float = Field(2.0, ge=0, description="classifier-free guidance; 1 = plain conditional")


class RendererSampler(Sampler):
    nar_steps: int = Field(8, ge=1, description="NAR renderer only: parallel decoding steps")
    nar_choice_temperature: float = Field(
        4.5, ge=0, description="NAR renderer only: Gumbel noise on the re-masking confidence (annealed to 0)"
    )

    def generate_kwargs(self, nar: bool) -> dict[str, Any]:
        """Keyword arguments of the renderer's generate (an AR renderer has no steps or choice temperature)."""
        kw: dict[str, Any] = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        if nar:
            kw |= {"steps": self.nar_steps, "choice_temperature": self.nar_choice_temperature}
        return kw


class Sample(Section):
    n: int = Field(500, ge=1, description="images per variant (balanced over classes if class-conditional)")
    batch_size: int = Field(50, ge=1, description="rows per decode batch (CFG doubles what the trunk runs)")
    shard_size: int = Field(1000, ge=1, description="samples per output shard; batches never span two")
    seed: int = Field(0, ge=0, description="sample i is drawn with a seed derived from (seed, i)")
    batch_invariant: bool = Field(
        False, description="rows computed one at a time: identical for any batch size, several times slower"
    )
    gpt: GPTSampler = GPTSampler(top_k=100)
    gpt_vq: GPTSampler | None = Field(None, description="stage 1 of variant vq; None = the same as gpt")
    renderer: RendererSampler = RendererSampler(top_p=0.5)

    def gpt_for(self, variant: str) -> GPTSampler:
        return self.gpt_vq if variant == "vq" and self.gpt_vq is not None else self.gpt

    def gpt_key(self, variant: str) -> str:
        """The params key of the variant's stage-1 sampler."""
        return "gpt_vq" if variant == "vq" and self.gpt_vq is not None else "gpt"


class TrainJudge(Section):
    """The offline FID/IS judge: a small CNN classifier trained on the real train images (see
    pipeline/models/judge.py). Its input size is base.image_size; its classes are the data's."""

    widths: tuple[int, ...] = Field(
        (16, 32, 64, 128), min_length=2, description="stem width, then one stride-2 stage per entry"
    )
    stem_stride: int = Field(2, ge=1, le=4)
    blocks_per_stage: int = Field(0, ge=0, description="residual 3x3 blocks after each downsampling conv")
    dropout: float = Field(0.0, ge=0, lt=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    flip: bool = Field(True, description="random horizontal flips (label-preserving for the built-in data)")
    train: Train = _train(
        steps=1800,
        batch_size=32,
        lr=3e-3,
        warmup_steps=20,
        min_lr_ratio=0.0,
        weight_decay=0.05,
        betas=(0.9, 0.999),
        checkpoint_every=600,
        log_every=50,
    )


class Fidelity(Section):
    """FID / IS / KID / precision-recall: the feature extractor and the metric options."""

    extractor: Literal["judge", "inception-v3-compat"] = Field(
        "judge", description="judge: models/judge (offline); inception-v3-compat: the standard numbers"
    )
    inception_weights: str | None = Field(
        None, description="local copy of torch-fidelity's Inception .pth; None: torch hub cache or download"
    )
    reference_images: int | None = Field(
        None, ge=4, description="val images in the reference statistics (None: all; else a seeded subset)"
    )
    kid_subset_size: int | None = Field(None, ge=2, description="None: min(1000, N_fake, N_real)")
    kid_subsets: int = Field(100, ge=1)
    isc_splits: int = Field(10, ge=1)
    prc_neighborhood: int = Field(3, ge=1)
    seed: int = Field(0, ge=0, description="KID subsets, IS split shuffling, the reference subset")
    batch_size: int = Field(100, ge=1, description="images per extractor forward")


class Probe(Section):
    """Linear probe of each block of both frozen GPTs (features mean-pooled over [BOS, tokens])."""

    train_images: int = Field(1000, ge=10, description="seeded subset of the train token shards")
    val_images: int = Field(500, ge=1, description="seeded subset of the val token shards")
    weight_decays: tuple[float, ...] = Field((1e-3, 1e-2, 1e-1), min_length=1)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    max_iter: int = Field(100, ge=1, description="L-BFGS iterations per fit")
    batch_size: int = Field(100, ge=1, description="sequences per GPT forward")
    seed: int = Field(0, ge=0, description="the image subsets and the held-out split")


class Stability(Section):
    """Paper Table 1: token change rate and latent cosine under Gaussian pixel noise, DiGIT vs VQ."""

    images: int = Field(200, ge=1, description="seeded subset of the val images")
    snrs_db: tuple[float, ...] = Field((30, 25, 20, 15, 10, 5, 1), min_length=1)
    batch_size: int = Field(50, ge=1)
    seed: int = Field(0, ge=0, description="the image subset and the noise patterns")


class UpperBound(Section):
    """FID/IS of (a) true val DiGIT tokens -> renderer -> VQ decoder and (b) plain VQ reconstructions."""

    images: int = Field(
        500, ge=4, description="seeded subset of val images; FID grows as N shrinks: compare upper_real_fid"
    )
    batch_size: int = Field(50, ge=1)
    seed: int = Field(0, ge=0, description="the subset, and the renderer draws of image i via (seed, i)")


class Evaluate(Section):
    fidelity: Fidelity = Fidelity()
    probe: Probe = Probe()
    stability: Stability = Stability()
    upper_bound: UpperBound = UpperBound()


def _section_from_dataclass(name: str, dc: type, exclude: tuple[str, ...] = ()) -> type[Section]:
    """A params section whose keys, types and defaults are those of a library config dataclass, so the
    dataclass stays the one definition; its own __post_init__ checks run as the section's validator."""
    hints = typing.get_type_hints(dc)
    fields_ = {
        f.name: (hints[f.name], f.default if f.default is not dataclasses.MISSING else f.default_factory())
        for f in dataclasses.fields(dc)
        if f.name not in exclude
    }

    def _check(self: Section) -> Section:
        dc(**self.model_dump())  # raises ValueError with the dataclass' own message
        return self

    return create_model(
        name, __base__=Section, __validators__={"_check": model_validator(mode="after")(_check)}, **fields_
    )


# The SSL encoder's input size is base.image_size, so it is not a knob of its own here.
PretrainEncoder = _section_from_dataclass("PretrainEncoder", SSLConfig, exclude=("img_size",))


class Params(Section):
    base: Base = Base()
    prepare: Prepare = Prepare()
    encoder: Encoder = Encoder()
    extract: Extract = Extract()
    kmeans: KMeans = KMeans()
    tokenize: Tokenize = Tokenize()
    pretrain_encoder: PretrainEncoder = PretrainEncoder()  # type: ignore[valid-type]
    train_vq: TrainVQ = TrainVQ()
    train_gpt: TrainGPT = TrainGPT()
    train_renderer: TrainRenderer = TrainRenderer()
    sample: Sample = Sample()
    train_judge: TrainJudge = TrainJudge()
    evaluate: Evaluate = Evaluate()


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if p not in ("function-after",)) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            lines.append(
                f"{source}: {path}: unknown key (got {e['input']!r}); check the spelling against the schema"
            )
        elif e["type"] == "value_error":
            lines.append(f"{source}: {path or 'section'}: {msg.removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: {path}: {msg} (got {e['input']!r})")
    return "invalid params\n  " + "\n  ".join(lines)


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(
            f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}"
        )
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_errors(e, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML ({e})") from None
    return parse_params(data, str(path))


def with_overrides(params: Params, overrides: dict[str, Any]) -> Params:
    """A copy of `params` with dotted-key overrides, e.g. {"prepare.train_size": 20}; validated."""
    data = params.model_dump()
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return parse_params(data, "overrides")


def dump_params(params: Params, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(params.model_dump(), sort_keys=False))
