"""YAML recipes with `defaults:` inheritance, dotted key=value overrides, and validation that
runs before any process group or tensor exists. Every failure is one line naming the key."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from megatron_reft.config.schema import Config


class ConfigError(ValueError):
    """One line per problem, each starting with the dotted key at fault."""


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml_with_defaults(path: str | Path, _seen: tuple = ()) -> dict:
    """A recipe, merged on top of the recipes its `defaults:` list names (relative paths)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"config: file not found: {path}")
    if path in _seen:
        raise ConfigError(f"defaults: cycle through {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping at top level")
    merged: dict = {}
    defaults = data.pop("defaults", []) or []
    for parent in [defaults] if isinstance(defaults, str) else defaults:
        merged = _merge(merged, read_yaml_with_defaults(path.parent / parent, _seen + (path,)))
    return _merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b=c` sets data['a']['b'] to YAML-parsed `c` (so 1e-5, true, null, [1,2] work)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are written key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node[part] = dict(node.get(part) or {})
            node = node[part]
        node[parts[-1]] = value
    return data


def _coerce(key: str, value, annotation):
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, bool):
        # YAML reads `model.use_te=true` as a boolean; textual choices spell it as the word
        return "true" if value else "false"
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{key}: expected int, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = _build(hint, data[f.name] or {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(prefix + f.name, data[f.name], hint)
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    data = read_yaml_with_defaults(path) if path else {}
    return _build(Config, apply_overrides(data, list(overrides)), "")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    """Atomically (a full disk leaves the previous config.yaml, no half-written one)."""
    from megatron_reft.reliability.storage import write_text_durably

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_durably(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def auto_true_false(value: str) -> bool | None:
    """A choice of "auto" | "true" | "false" (validated by config/validate.py) as None | True |
    False: None leaves the decision to the code that knows the machine or the batch."""
    return {"auto": None, "true": True, "false": False}[value.lower()]
