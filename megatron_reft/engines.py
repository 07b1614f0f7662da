"""Building the engines a job needs, in one place beside the engine (issue 12, item 6): the
policy (with or without a shared value head), the frozen reference, and the critic in either mode.

Every job (sft, ppo, online-st, eval, train-rm, offline-st-data, demo) builds its engines here,
so no job imports another job to get one.
"""
from __future__ import annotations

from megatron_reft.config.load import auto_true_false
from megatron_reft.engine import Engine, OptimSettings, resolve_dtype


def optim_settings(config, *, lr=None, weight_decay=None, clip_grad=None) -> OptimSettings:
    """The job's optimizer settings (config.optim), with per-model overrides."""
    o = config.optim
    return OptimSettings(lr=o.lr if lr is None else lr,
                         weight_decay=o.weight_decay if weight_decay is None else weight_decay,
                         adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                         clip_grad=o.clip_grad if clip_grad is None else clip_grad,
                         use_distributed_optimizer=config.parallel.use_distributed_optimizer)


def _engine(config, model_cfg, optim: OptimSettings | None, value_head: bool,
            value_only: bool = False) -> Engine:
    return Engine(model_cfg, dtype=resolve_dtype(config.model.dtype), use_te=auto_true_false(config.model.use_te),
                  optim=optim, recompute=config.model.recompute, with_value_head=value_head,
                  attention=config.model.attention, logprob_chunk_tokens=config.ppo.logprob_chunk_tokens,
                  value_only=value_only)


def build_engine(config, model_cfg, optim: bool = True, value_head: bool = False) -> Engine:
    """The policy (optim=True; value_head=True for a shared-trunk critic) or a frozen model."""
    return _engine(config, model_cfg, optim_settings(config) if optim else None, value_head)


def critic_lr(config) -> float:
    return config.optim.lr if config.critic.lr is None else config.critic.lr


def build_critic_engine(config, model_cfg) -> Engine:
    """A separate critic's trunk + value head with its own optimizer (critic.* settings), built
    in the current megatron parallel state (the critic role's, in a split world)."""
    c = config.critic
    settings = optim_settings(config, lr=critic_lr(config), weight_decay=c.weight_decay,
                              clip_grad=c.clip_grad)
    return _engine(config, model_cfg, settings, value_head=True, value_only=True)


def load_critic_weights(engine: Engine, config) -> None:
    """critic.load, else the warm-up checkpoint (model.load); the head stays freshly drawn unless
    the checkpoint has one (reft.md §4: the value model starts from the warm-up policy)."""
    from megatron_reft.checkpoint.io import load_checkpoint

    source = config.critic.load or config.model.load
    engine.reset_value_head(config.trainer.seed)
    if source is None:
        engine.init_from_scratch(config.trainer.seed)
        return
    load_checkpoint(source, engine.module)
    engine._sync_param_copies()


def build_critic(config, model_cfg, policy: Engine | None = None, split=None):
    """The trainer's critic object for critic.mode.

    shared: the policy's own value head. separate, no split world: a LocalCritic on these ranks.
    separate in a split world: RemoteCritic on actor ranks; on critic ranks a CriticServer
    (call `.serve()`; it returns when the actor closes the critic).
    """
    from megatron_reft.critic import LocalCritic, SharedTrunkCritic

    if config.critic.mode == "shared":
        return SharedTrunkCritic(policy)
    from megatron_reft.distributed.roles import current_role, current_split, role_group

    role, split = current_role(), split or current_split()
    if role is not None and role.name == "actor":
        from megatron_reft.critic_server import RemoteCritic

        return RemoteCritic(split)
    engine = build_critic_engine(config, model_cfg)
    load_critic_weights(engine, config)
    local = LocalCritic(engine, vf_coef=config.ppo.vf_coef, value_clip=config.ppo.value_clip,
                        lr=critic_lr(config), group=role_group())
    if role is None:
        return local
    from megatron_reft.critic_server import CriticServer

    micro = config.critic.micro_batch_size or config.trainer.micro_batch_size
    return CriticServer(local, split, micro)
