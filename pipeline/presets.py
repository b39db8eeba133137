"""Presets: named partial params files (`presets/<name>.yaml`) that turn params.yaml into a recipe.

`python -m pipeline.cli preset imagenet-base` merges the preset into params.yaml in place: every key the
preset gives replaces the value there (keys absent from the preset keep theirs), the preset's end-of-line
comment (where the value comes from) replaces the old one on that line, every other comment and the layout
of params.yaml are kept (ruamel.yaml round trip), and the result is validated by the schema
(pipeline/config.py) before anything is written — atomically. Several names apply left to right; a preset
may start from others with a top-level `extends: name` (or a list). Mappings that are sections of the
schema are merged key by key; any other value (a list, a `{...}` field such as train_gpt.vq_model, null) is
replaced whole, so applying a preset twice changes nothing.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import YAMLError
from ruamel.yaml.tokens import CommentToken

from pipeline.config import Params, ParamsError, parse_params

PRESETS_DIR = Path(__file__).resolve().parents[1] / "presets"
EXTENDS = "extends"


class PresetError(ValueError):
    """A preset that cannot be found, read or applied; the message names the file and the key."""


def _yaml() -> YAML:
    y = YAML()
    y.width = 4096  # never re-wrap long lines
    y.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return y


def available(directory: Path = PRESETS_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def preset_path(name: str, directory: Path = PRESETS_DIR) -> Path:
    """`name` as a preset of `directory`, or a path to a .yaml file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    path = directory / f"{name}.yaml"
    if not path.is_file():
        raise PresetError(
            f"preset {name!r}: no {path}; available: {', '.join(available(directory)) or 'none'}"
        )
    return path


def _load(path: Path) -> CommentedMap:
    try:
        data = _yaml().load(path.read_text())
    except YAMLError as e:
        raise PresetError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, CommentedMap):
        raise PresetError(f"{path}: expected a mapping of params sections at the top level")
    return data


def _section_type(model: type[BaseModel] | None, key: str) -> type[BaseModel] | None:
    """The schema class of `model.key` if that field is itself a section (merged key by key)."""
    if model is None or key not in model.model_fields:
        return None
    ann = model.model_fields[key].annotation
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _token(m: CommentedMap, key: str) -> Any:
    item = m.ca.items.get(key)
    return item[2] if item and len(item) > 2 else None


def _eol_comment(m: CommentedMap, key: str) -> str | None:
    """The first line of the end-of-line comment after `key:` (ruamel keeps the full-line comments and
    blank lines that follow in the same token; they belong to what comes next)."""
    token = _token(m, key)
    first = token.value.split("\n", 1)[0].strip() if token is not None else ""
    return first or None


def _set_eol_comment(m: CommentedMap, key: str, comment: str) -> None:
    token = _token(m, key)
    if token is None or not token.value.split("\n", 1)[0].strip():
        # no comment on that line yet: align with the map's other end-of-line comments
        columns = [t[2].column for t in m.ca.items.values() if len(t) > 2 and t[2] is not None]
        rest = token.value.split("\n", 1)[1] if token is not None and "\n" in token.value else ""
        m.yaml_add_eol_comment(comment, key, column=max(columns) if columns else None)
        if rest:
            _token(m, key).value += rest
        return
    rest = token.value.split("\n", 1)
    token.value = comment + "\n" + (rest[1] if len(rest) > 1 else "")


def _end(m: CommentedMap, key: str) -> tuple[CommentedMap, str]:
    """The (map, key) whose comment token is the last thing written for m[key] (the deepest last key of a
    block mapping): where the lines that follow the value (blank lines, the next section's header) live."""
    value = m[key]
    if isinstance(value, CommentedMap) and len(value) and not value.fa.flow_style():
        return _end(value, list(value)[-1])
    return m, key


def _pop_trailing(m: CommentedMap, key: str) -> str:
    token = _token(m, key)
    if token is None or "\n" not in token.value:
        return ""
    first, rest = token.value.split("\n", 1)
    token.value = first + "\n"
    return rest


def _push_trailing(m: CommentedMap, key: str, rest: str) -> None:
    if not rest:
        return
    token = _token(m, key)
    if token is None:
        m.ca.items.setdefault(key, [None, None, None, None])
        m.ca.items[key][2] = CommentToken("\n" + rest, column=0)
    else:
        token.value = token.value.rstrip("\n") + "\n" + rest if token.value.strip() else "\n" + rest


def merge_into(
    target: CommentedMap, source: Mapping[str, Any], model: type[BaseModel] | None = Params
) -> None:
    """Merge `source` into `target` in place (see the module docstring)."""
    for key, value in source.items():
        sub = _section_type(model, key)
        comment = _eol_comment(source, key) if isinstance(source, CommentedMap) else None
        if sub is not None and isinstance(value, Mapping) and isinstance(target.get(key), CommentedMap):
            merge_into(target[key], value, sub)
            if comment is not None:
                _set_eol_comment(target, key, comment)
            continue
        # what followed the old value (blank lines, the next key's header comment) follows the new one
        rest = _pop_trailing(*_end(target, key)) if key in target else ""
        if isinstance(source, CommentedMap) and isinstance(value, CommentedMap):
            _pop_trailing(*_end(source, key))  # the preset file's own following lines stay there
        target[key] = value
        if comment is not None:
            _set_eol_comment(target, key, comment)
        _push_trailing(*_end(target, key), rest)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict) or not data:
        return {prefix.rstrip("."): data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out |= _flat(value, f"{prefix}{key}.")
    return out


def changed_values(before: Any, after: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, old, new) of every leaf that differs between two plain params mappings."""
    a, b = _flat(before), _flat(after)
    return [
        (k, a.get(k, "<absent>"), b.get(k, "<absent>"))
        for k in dict.fromkeys([*a, *b])
        if a.get(k) != b.get(k)
    ]


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value))


def load_preset(name: str, directory: Path = PRESETS_DIR, _chain: tuple[str, ...] = ()) -> CommentedMap:
    """A preset with everything it extends merged in (parents first, the preset's own keys last)."""
    path = preset_path(name, directory)
    if str(path) in _chain:
        raise PresetError(f"{path}: `extends` loops back to itself ({' -> '.join(_chain)})")
    data = _load(path)
    parents = data.pop(EXTENDS, None)
    parents = [parents] if isinstance(parents, str) else list(parents or [])
    merged = CommentedMap()
    for parent in parents:
        merge_into(merged, load_preset(parent, directory, (*_chain, str(path))))
    merge_into(merged, data)
    return merged


def apply_presets(
    names: list[str],
    params_path: str | Path = "params.yaml",
    write: bool = True,
    directory: Path = PRESETS_DIR,
) -> tuple[Params, list[tuple[str, Any, Any]]]:
    """Merge the presets (left to right) into params_path; validate; write atomically unless write=False.
    Returns the validated params and the changed (key, old, new) values."""
    if not names:
        raise PresetError("no preset named; available: " + ", ".join(available(directory)))
    params_path = Path(params_path)
    y = _yaml()
    try:
        doc = y.load(params_path.read_text())
    except (OSError, YAMLError) as e:
        raise PresetError(f"{params_path}: cannot read it as YAML ({e})") from None
    before = _plain(doc)
    for name in names:
        merge_into(doc, load_preset(name, directory))
    changes = changed_values(before, _plain(doc))
    where = f"{params_path} with preset {' + '.join(names)}"
    try:
        params = parse_params(_plain(doc), where)
    except ParamsError as e:
        raise PresetError(str(e)) from None
    if write:
        buf = io.StringIO()
        y.dump(doc, buf)
        tmp = params_path.with_name(params_path.name + ".tmp")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, params_path)
    return params, changes
