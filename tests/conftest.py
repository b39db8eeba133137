import os
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
