"""Typed schema of params.yaml: one model per section, validated before any stage does work.

Every field has the default shipped in params.yaml, so tests can build tiny configs by overriding a few
keys. Unknown keys, wrong types and out-of-range values raise `ParamsError` naming the key path, the
bad value and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ParamsError(ValueError):
    """A params file that does not match the schema; the message names every offending key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Base(Section):
    seed: int = Field(0, ge=0, description="root seed; every stage derives its own seeds from it")
    image_size: int = Field(64, ge=16, le=1024, description="side of the square RGB images in the shards")
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


class Params(Section):
    base: Base = Base()
    prepare: Prepare = Prepare()


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
