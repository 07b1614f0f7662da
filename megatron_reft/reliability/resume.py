"""Resume safety: before a job resumes in an existing run directory, compare what the run was
started with (the checkpoint's model.yaml and trainer state, the directory's config.yaml) with
the new config.

Refused (ConfigError, one line naming the keys): a different architecture, vocabulary or family
(the weights cannot load), and changes to what the saved data position means — the batch size
the sampler counts in (`trainer.global_batch_size` for SFT, `ppo.rollout_batch_size` for PPO),
`trainer.seed` (the shuffle order) and the training data. Allowed and logged: everything else
(parallel layout, micro-batch size, max_steps, intervals, learning rate, ...). The batch-size rule
is documented in docs/reliability.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from megatron_reft.config import Config, ConfigError, ModelConfig, load_config, to_dict
from megatron_reft.models.families import as_dict

# ModelConfig fields that do not change the weights' shapes or meaning.
MODEL_FIELDS_FREE = ("init_std", "preset")
# Config keys that fix the data order a saved sampler position refers to.
DATA_ORDER_KEYS = ("trainer.seed", "data.train_file", "data.format", "data.cot_type",
                   "data.synthetic_train_items", "data.synthetic_seed", "data.synthetic_difficulty")
BATCH_KEY = {"sft": "trainer.global_batch_size", "ppo": "ppo.rollout_batch_size"}


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def model_differences(checkpoint: Path, model: ModelConfig) -> list[str]:
    from megatron_reft.checkpoint.io import read_model_yaml

    saved, new = as_dict(read_model_yaml(checkpoint)), as_dict(model)
    return [f"model.{k} {saved.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(saved) | set(new))
            if k not in MODEL_FIELDS_FREE and saved.get(k) != new.get(k)]


def config_differences(saved_path: Path, config: Config) -> dict[str, tuple]:
    saved = _flat(to_dict(load_config(saved_path)))
    new = _flat(to_dict(config))
    return {k: (saved.get(k), new.get(k)) for k in sorted(set(saved) | set(new)) if saved.get(k) != new.get(k)}


def _sampler_batch(checkpoint: Path):
    state_file = checkpoint / "trainer_state.json"
    if not state_file.is_file():
        return None
    return json.loads(state_file.read_text()).get("sampler", {}).get("global_batch_size")


def check_resume(config: Config, model: ModelConfig, checkpoint: Path, job: str) -> list[str]:
    """Raise ConfigError for changes that cannot resume; return log lines for those that can."""
    problems = model_differences(checkpoint, model)
    if problems:
        raise ConfigError(f"{', '.join(p.split()[0] for p in problems)}: cannot change when "
                          f"resuming from {checkpoint} ({'; '.join(problems)}); use a new "
                          "trainer.output_dir or trainer.resume=none")
    batch_key = BATCH_KEY.get(job)
    section, name = batch_key.split(".") if batch_key else (None, None)
    saved_batch = _sampler_batch(checkpoint)
    if batch_key and saved_batch is not None and saved_batch != getattr(getattr(config, section), name):
        raise ConfigError(f"{batch_key}: {getattr(getattr(config, section), name)} differs from "
                          f"{saved_batch} in {checkpoint}; the saved data position and schedule count "
                          "batches of that size (see docs/reliability.md, batch-size rule)")
    saved_config = Path(config.trainer.output_dir) / "config.yaml"
    if not saved_config.is_file():
        return []
    changed = config_differences(saved_config, config)
    refused = [k for k in changed if k in DATA_ORDER_KEYS]
    if refused:
        detail = "; ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in refused)
        raise ConfigError(f"{', '.join(refused)}: cannot change when resuming in {config.trainer.output_dir} "
                          f"({detail}): the saved data position would not mean the same items")
    if not changed:
        return []
    return ["resume: changed since the run started: " +
            ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())]
