"""Checkpoints as safetensors + JSON: nothing read from disk is ever unpickled.

A checkpoint directory holds
  model.safetensors   the module's state dict (tensors only)
  config.json         {"kind": ..., "config": {...}, "step": int, ...extra}
  optim.safetensors   optional: optimizer state flattened to tensors (for resume)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.io import sha256_files

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPTIM_FILE = "optim.safetensors"


class CheckpointError(RuntimeError):
    pass


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone so tied weights serialise.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def flatten_optimizer_state(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able metadata."""
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict[str, Any]] = {}
    for pid, slots in opt_state["state"].items():
        meta_state[str(pid)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                meta_state[str(pid)][name] = value
    return _contiguous(tensors), {"state": meta_state, "param_groups": opt_state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(slots) for pid, slots in meta["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    model_state: dict[str, torch.Tensor],
    meta: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically: into `<dir>.tmp`, then rename over `<dir>`."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(_contiguous(model_state), str(tmp / MODEL_FILE))
    meta = dict(meta)
    if optimizer_state is not None:
        tensors, opt_meta = flatten_optimizer_state(optimizer_state)
        save_file(tensors, str(tmp / OPTIM_FILE))
        meta["optimizer"] = opt_meta
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)
    return directory


def load_checkpoint(
    directory: str | Path, map_location: str = "cpu", with_optimizer: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any] | None]:
    """Return (model_state, meta, optimizer_state_or_None)."""
    directory = Path(directory)
    model_path, config_path = directory / MODEL_FILE, directory / CONFIG_FILE
    for p in (model_path, config_path):
        if not p.is_file():
            raise CheckpointError(
                f"{p}: missing; a checkpoint directory needs {MODEL_FILE} and {CONFIG_FILE}"
            )
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    state = load_file(str(model_path), device=map_location)
    opt_state = None
    if with_optimizer:
        opt_meta = meta.get("optimizer")
        if opt_meta is None or not (directory / OPTIM_FILE).is_file():
            raise CheckpointError(f"{directory}: no optimizer state saved; cannot resume training from it")
        opt_state = unflatten_optimizer_state(
            load_file(str(directory / OPTIM_FILE), device=map_location), opt_meta
        )
    return state, meta, opt_state


M = TypeVar("M", bound=nn.Module)


def load_model(
    directory: str | Path, kind: str, build: Callable[[dict[str, Any]], M], map_location: str = "cpu"
) -> M:
    """The model of a checkpoint directory whose config.json says `kind`: `build(meta["config"])`, then the
    saved weights (strict), on `map_location`."""
    state, meta, _ = load_checkpoint(directory, map_location=map_location)
    if meta.get("kind") != kind or not isinstance(meta.get("config"), dict):
        raise CheckpointError(
            f"{Path(directory) / CONFIG_FILE}: kind is {meta.get('kind')!r}, expected {kind!r} "
            "with a 'config' dict"
        )
    model = build(meta["config"])
    model.load_state_dict(state)
    return model.to(map_location)


def checkpoint_sha256(directory: str | Path) -> str:
    """Hash of what defines a saved model: its weights and its config.json (not optimizer state)."""
    return sha256_files([Path(directory) / MODEL_FILE, Path(directory) / CONFIG_FILE])
