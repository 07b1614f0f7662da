"""Configuration: typed dataclasses (schema), YAML + overrides (load), checks (validate)."""
from __future__ import annotations

import dataclasses

from megatron_reft.config.load import ConfigError, auto_true_false, load_config, save_config, to_dict
from megatron_reft.config.schema import Config
from megatron_reft.config.validate import validate, world_size_from_env
from megatron_reft.models.families import ModelConfig, model_config_from_preset

_ARCH_FIELDS = [f.name for f in dataclasses.fields(ModelConfig) if f.name != "preset"]


def resolve_model_config(config: Config, vocab_size: int | None = None) -> ModelConfig:
    """Architecture from model.load's model.yaml, else model.preset, else the fields alone;
    fields set in the config override. `vocab_size` (a tokenizer's) fills an unset vocabulary."""
    section = config.model
    base: dict = {}
    if section.load:
        from megatron_reft.checkpoint.io import read_model_yaml

        base = dataclasses.asdict(read_model_yaml(section.load))
    elif section.preset:
        base = dataclasses.asdict(model_config_from_preset(section.preset))
    overrides = {k: getattr(section, k) for k in _ARCH_FIELDS if getattr(section, k, None) is not None}
    merged = {**base, **overrides}
    if vocab_size is not None and "vocab_size" not in overrides and not section.load:
        merged["vocab_size"] = vocab_size
    try:
        return ModelConfig(**merged)
    except TypeError as err:
        raise ConfigError(f"model: incomplete architecture ({err}); set model.preset or model.load") from None


__all__ = ["Config", "ConfigError", "auto_true_false", "ModelConfig", "load_config", "save_config", "to_dict",
           "validate", "resolve_model_config", "world_size_from_env"]
