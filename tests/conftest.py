import os
import subprocess
import sys
import tempfile

# Offline and quiet before anything imports prefect, dvc or huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="digit-prefect-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.checkpoint import save_checkpoint  # noqa: E402
from pipeline.config import Params, with_overrides  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def tiny_params(**overrides) -> Params:
    """Default params with dotted-key overrides (e.g. prepare__train_size=20 → prepare.train_size)."""
    base = {"prepare.train_size": 24, "prepare.val_size": 12, "prepare.shard_size": 10, "base.image_size": 32}
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return with_overrides(Params(), base)


@pytest.fixture
def params_factory():
    return tiny_params


# The tiny end-to-end chain (prepare → … → sample) shared by the stage tests: a random 32-px ViT as the
# encoder and every trained model a few steps of a few channels.
TIMM_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0)
TINY_TRAIN = {"steps": 6, "batch_size": 4, "warmup_steps": 1, "log_every": 1}


def chain_params(encoder_dir: Path, model: dict, n_samples: int, **overrides) -> Params:
    """tiny_params for the whole chain; `model` is the GPT's and the renderer's size."""
    tiny = dict(
        encoder__source="ssl",
        encoder__weights=str(encoder_dir),
        kmeans__k=8,
        kmeans__sample_patches=320,
        train_vq__channels=8,
        train_vq__codebook_size=16,
        train_vq__codebook_dim=4,
        train_vq__train={"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
        train_gpt__model=model,
        train_gpt__train=TINY_TRAIN,
        train_renderer__model=model,
        train_renderer__train=TINY_TRAIN,
        sample__n=n_samples,
        sample__batch_size=4,
    )
    return tiny_params(**{**tiny, **overrides})


@pytest.fixture(scope="module")
def one_thread():
    # the machine's cores are shared; one thread is also faster for models this small
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A random ViT saved as an `ssl` encoder checkpoint."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(**TIMM_KWARGS)
    d = tmp_path_factory.mktemp("enc") / "encoder"
    meta = {"kind": "ssl_vit", "timm_kwargs": TIMM_KWARGS, "mean": [0.5] * 3, "std": [0.25] * 3}
    save_checkpoint(d, vit.state_dict(), {**meta, "img_size": 32, "patch_size": 8})
    return d


def run_module(cwd: Path, *args: str, timeout: int = 1200, stdout_only: bool = False) -> str:
    """`python -m <args>` in `cwd` with this interpreter, its venv first on PATH (DVC stages call plain
    `python`), asserting success; returns stdout (+ stderr)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{args}: {r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout if stdout_only else r.stdout + r.stderr
