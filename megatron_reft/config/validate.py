"""Checks that need no process group or tensor: they run before start-up so an impossible
layout or a missing file costs seconds, not a queue wait plus a crash."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from megatron_reft.config.load import ConfigError
from megatron_reft.config.schema import Config
from megatron_reft.models.families import ModelConfig

CHOICES = {
    "data.cot_type": ("ncot", "pcot"),
    "data.on_malformed": ("report", "raise"),
    "data.overlong_prompts": ("drop", "truncate"),
    "data.format": ("auto", "mwp_reft", "gsm8k", "jsonl", "hf"),
    "optim.schedule": ("linear", "constant"),
    "model.dtype": ("auto", "fp32", "bf16", "fp16"),
    "model.use_te": ("auto", "true", "false"),
    "model.attention": ("sdpa", "megatron"),
    "critic.mode": ("shared", "separate"),
    "ppo.align_prompts": ("auto", "true", "false"),
}


def _get(config: Config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _file_errors(config: Config, job: str) -> list[str]:
    errors = []
    for key in ("data.train_file", "data.eval_file", "data.tokenizer", "model.load"):
        value = _get(config, key)
        if value is None or value == "synthetic" or str(value).startswith("hf:"):
            continue
        if not os.path.exists(value):
            errors.append(f"{key}: not found: {value}")
    if job in ("sft", "ppo") and config.data.train_file is None:
        errors.append("data.train_file: required (a path, hf:<name>, or synthetic)")
    if config.model.load is None and config.model.preset is None and config.model.family is None:
        errors.append("model.preset: set a preset, model.load (a checkpoint) or the model fields")
    return errors


def _layout_errors(model: ModelConfig, config: Config, world_size: int | None, job: str = "sft") -> list[str]:
    p = config.parallel
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    errors = []
    if tp < 1 or pp < 1:
        return ["parallel.tensor_model_parallel_size: TP and PP must be >= 1"]
    if model.num_attention_heads % tp:
        errors.append(f"parallel.tensor_model_parallel_size: {tp} does not divide "
                      f"model.num_attention_heads={model.num_attention_heads}")
    groups = model.num_query_groups
    if groups % tp and tp % groups:
        errors.append(f"parallel.tensor_model_parallel_size: {tp} must divide or be a multiple of "
                      f"model.num_query_groups={groups}")
    if model.num_layers % pp:
        errors.append(f"parallel.pipeline_model_parallel_size: {pp} does not divide "
                      f"model.num_layers={model.num_layers}")
    if model.hidden_size % model.num_attention_heads:
        errors.append(f"model.hidden_size: {model.hidden_size} not divisible by "
                      f"model.num_attention_heads={model.num_attention_heads}")
    if world_size is not None:
        if world_size % (tp * pp):
            errors.append(f"parallel.tensor_model_parallel_size: world size {world_size} is not "
                          f"TP x PP x DP with TP={tp}, PP={pp}")
        else:
            errors += _batch_errors(config, world_size // (tp * pp), job)
    return errors


def _batch_errors(config: Config, dp: int, job: str) -> list[str]:
    """SFT splits trainer.global_batch_size into equal micro-batches on every DP rank; PPO splits
    each rank's share of a rollout into mini-batches (a short last micro-batch is padded with
    masked rows, so trainer.micro_batch_size need not divide it)."""
    t, ppo = config.trainer, config.ppo
    errors = []
    if job == "sft" and t.global_batch_size % (t.micro_batch_size * dp):
        errors.append(f"trainer.global_batch_size: {t.global_batch_size} is not divisible by "
                      f"trainer.micro_batch_size x DP = {t.micro_batch_size} x {dp}")
    if job != "ppo":
        return errors
    if ppo.rollout_batch_size % dp:
        errors.append(f"ppo.rollout_batch_size: {ppo.rollout_batch_size} is not divisible by DP={dp}")
    mini = ppo.mini_batch_size or ppo.rollout_batch_size
    if ppo.rollout_batch_size % mini:
        errors.append(f"ppo.mini_batch_size: {mini} does not divide ppo.rollout_batch_size="
                      f"{ppo.rollout_batch_size}")
    elif mini % dp:
        errors.append(f"ppo.mini_batch_size: {mini} is not divisible by DP={dp}")
    return errors


def _value_errors(config: Config) -> list[str]:
    errors = [f"{key}: {_get(config, key)!r} is not one of {', '.join(choices)}"
              for key, choices in CHOICES.items() if str(_get(config, key)).lower() not in choices]
    d, o, ppo = config.data, config.optim, config.ppo
    if d.max_prompt_length >= d.max_total_length:
        errors.append(f"data.max_prompt_length: {d.max_prompt_length} must be below "
                      f"data.max_total_length={d.max_total_length}")
    if not 0 <= o.warmup_fraction < 1:
        errors.append(f"optim.warmup_fraction: {o.warmup_fraction} must be in [0, 1)")
    if ppo.temperature < 0:
        errors.append(f"ppo.temperature: {ppo.temperature} must be >= 0")
    if not 0 < ppo.top_p <= 1:
        errors.append(f"ppo.top_p: {ppo.top_p} must be in (0, 1]")
    if config.trainer.micro_batch_size < 1:
        errors.append("trainer.micro_batch_size: must be >= 1")
    keep = config.trainer.keep_epochs
    if not isinstance(keep, list) or not all(type(e) is int and e >= 1 for e in keep):
        errors.append(f"trainer.keep_epochs: {keep!r} must be a list of epoch numbers >= 1, e.g. [2]")
    if config.trainer.wandb_project and importlib.util.find_spec("wandb") is None:
        errors.append("trainer.wandb_project: wandb is not installed (pip install 'megatron-reft[wandb]')")
    if config.trainer.log_interval < 1:
        errors.append(f"trainer.log_interval: {config.trainer.log_interval} must be >= 1")
    for key in ("sample_interval", "num_samples"):
        if getattr(config.trainer, key) < 0:
            errors.append(f"trainer.{key}: {getattr(config.trainer, key)} must be >= 0")
    if config.trainer.micro_batch_tokens is not None and config.trainer.micro_batch_tokens < 1:
        errors.append("trainer.micro_batch_tokens: must be >= 1 (or unset)")
    if config.model.cuda_graph_decode:
        errors += _static_decode_errors(config)
    return errors


def _static_decode_errors(config: Config) -> list[str]:
    """model.cuda_graph_decode's fixed-shape decode step (generation/static_step.py) runs on one
    pipeline stage of the local SDPA layer spec."""
    errors = []
    if config.parallel.pipeline_model_parallel_size > 1:
        errors.append("model.cuda_graph_decode: needs parallel.pipeline_model_parallel_size 1 "
                      f"(got {config.parallel.pipeline_model_parallel_size})")
    from megatron_reft.models.build import te_available

    use_te = str(config.model.use_te).lower()
    if use_te == "true" or (use_te == "auto" and te_available()) or str(config.model.attention).lower() != "sdpa":
        errors.append("model.cuda_graph_decode: needs the local SDPA layer spec (model.use_te: false or auto "
                      "without Transformer Engine, model.attention: sdpa)")
    return errors


def _critic_errors(config: Config, model: ModelConfig | None, world_size: int | None,
                   job: str) -> list[str]:
    """A separate critic (issue 12): on the actor's ranks (critic.world_size unset) or on
    critic.world_size ranks of its own with its own TP x PP."""
    c = config.critic
    if c.mode != "separate" or job != "ppo":  # only PPO builds a critic (eval of a PPO recipe runs)
        return []
    errors = [] if c.load is None or os.path.exists(c.load) else [f"critic.load: not found: {c.load}"]
    tp, pp = c.tensor_model_parallel_size, c.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        return errors + ["critic.tensor_model_parallel_size: TP and PP must be >= 1"]
    if c.world_size is None:
        p = config.parallel
        if (tp, pp) != (p.tensor_model_parallel_size, p.pipeline_model_parallel_size):
            errors.append("critic.tensor_model_parallel_size: a critic on the actor's ranks "
                          "(critic.world_size unset) uses the actor's TP x PP; set critic.world_size "
                          "for a layout of its own")
        return errors
    if c.world_size < 1:
        return errors + ["critic.world_size: must be >= 1 (or unset: the actor's ranks)"]
    if c.world_size % (tp * pp):
        errors.append(f"critic.world_size: {c.world_size} is not a multiple of critic TP x PP = {tp} x {pp}")
    if world_size is not None and world_size - c.world_size < 1:
        errors.append(f"critic.world_size: {c.world_size} leaves no actor rank in a world of {world_size}")
    if model is not None:
        if model.num_attention_heads % tp:
            errors.append(f"critic.tensor_model_parallel_size: {tp} does not divide "
                          f"model.num_attention_heads={model.num_attention_heads}")
        if model.num_layers % pp:
            errors.append(f"critic.pipeline_model_parallel_size: {pp} does not divide "
                          f"model.num_layers={model.num_layers}")
    return errors


def actor_world_size(config: Config, world_size: int | None, job: str = "ppo") -> int | None:
    """Ranks left to the policy: all of them, less a separate critic's."""
    if world_size is None or job != "ppo" or config.critic.mode != "separate" or not config.critic.world_size:
        return world_size
    return max(world_size - config.critic.world_size, 1)


def validate(config: Config, model: ModelConfig | None, *, job: str = "sft",
             world_size: int | None = None) -> None:
    """Raise ConfigError listing every problem, one line each, naming the key."""
    critic_errors = _critic_errors(config, model, world_size, job)
    errors = _value_errors(config) + _file_errors(config, job) + critic_errors
    whole_world, world_size = world_size, actor_world_size(config, world_size, job)
    if any(e.startswith("critic.world_size") for e in critic_errors):
        whole_world = world_size = None  # no valid split: the world's rules would only repeat it
    if model is not None:
        layout_errors = _layout_errors(model, config, world_size, job)
        errors += layout_errors
        needed = config.data.max_length if job == "sft" else config.data.max_total_length
        if model.family == "opt" and needed > model.max_position_embeddings:
            errors.append(f"data.max_length: {needed} exceeds model.max_position_embeddings="
                          f"{model.max_position_embeddings} (learned positions)")
        if model.sliding_window is not None and needed > model.sliding_window:
            # megatron's attention here is full: exact only while sequences fit in the window
            errors.append(f"data.max_length: {needed} exceeds the model's sliding_window="
                          f"{model.sliding_window} (Mistral-style windowed attention is not modelled)")
        if not layout_errors and not critic_errors:  # the memory plan (issue 6) needs a valid layout to mean anything
            from megatron_reft.planning import check_fits

            errors += check_fits(config, model, job=job, world_size=whole_world)  # both roles
    if errors:
        raise ConfigError("\n".join(errors))


def world_size_from_env() -> int | None:
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if key in os.environ:
            return int(os.environ[key])
    return None


def output_dir(config: Config) -> Path:
    return Path(config.trainer.output_dir)
