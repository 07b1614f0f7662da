"""Typed configuration for every job (sft, ppo, eval, demo). Documented key by key in
docs/configuration.md; defaults follow reft.md §5 where the paper sets a value."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelSection:
    """The architecture comes from `load` (a converted/trained checkpoint's model.yaml), else
    from `preset`; any field set here overrides it."""

    preset: Optional[str] = None
    load: Optional[str] = None  # checkpoint directory to initialise weights (and architecture) from
    family: Optional[str] = None
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    vocab_size: Optional[int] = None
    max_position_embeddings: Optional[int] = None
    rope_theta: Optional[float] = None
    norm_eps: Optional[float] = None
    activation: Optional[str] = None
    tie_embeddings: Optional[bool] = None
    init_std: Optional[float] = None
    make_vocab_size_divisible_by: Optional[int] = None
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    use_te: str = "auto"  # auto: Transformer Engine spec when it imports
    attention: str = "sdpa"  # core attention of the local (non-TE) spec: sdpa | megatron
    recompute: bool = False  # full activation recomputation per layer
    # Decode steps (rollouts, greedy and sampled eval) at fixed shapes, replayed as CUDA graphs (GPU,
    # TP = PP = 1, local SDPA spec; eager elsewhere; needs PP = 1). Off until measured on a GPU.
    cuda_graph_decode: bool = False


@dataclass
class DataSection:
    train_file: Optional[str] = None  # path, "hf:<name or path>[:split]" or "synthetic"
    eval_file: Optional[str] = None  # held-out items for loss (SFT) and accuracy (PPO/eval)
    format: str = "auto"  # auto | mwp_reft | gsm8k | jsonl | hf
    cot_type: str = "ncot"  # ncot | pcot
    tokenizer: Optional[str] = None  # HF dir or SentencePiece model; default: the model checkpoint's
    on_malformed: str = "report"  # report | raise
    max_length: int = 1024  # SFT: prompt + target tokens (reft.md §5)
    max_prompt_length: int = 300  # RL prompt limit (reft.md §5)
    overlong_prompts: str = "drop"  # drop | truncate (the reference: keep the first max_prompt_length tokens)
    max_total_length: int = 700  # RL prompt + response limit (reft.md §5)
    max_eval_items: Optional[int] = None
    synthetic_train_items: int = 2000
    synthetic_eval_items: int = 200
    synthetic_difficulty: int = 2
    synthetic_seed: int = 0
    synthetic_vocab_size: int = 384


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    use_distributed_optimizer: bool = False
    sequence_parallel: bool = False
    timeout_minutes: float = 10.0  # a collective waiting longer than this fails the job
    # Memory plan (megatron_reft/planning.py): GiB per GPU; when set, validation refuses a layout
    # whose plan does not fit and warns above 90%. None: unknown, no check.
    gpu_memory_gb: Optional[float] = None
    # GPUs a recipe is planned for (nodes × GPUs per node), used by validation and
    # `megatron-reft plan` when no launcher says; the launcher's world size wins at run time.
    planned_world_size: Optional[int] = None


@dataclass
class OptimSection:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    schedule: str = "linear"  # linear (decay to min_lr after warm-up) | constant
    warmup_fraction: float = 0.1
    planned_epochs: Optional[int] = None  # schedule length in epochs (SFT: 40); default trainer.epochs


@dataclass
class TrainerSection:
    output_dir: str = "runs/default"
    seed: int = 42
    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many optimizer steps (wins over epochs)
    max_seconds: Optional[float] = None  # stop (and checkpoint) after this much training wall-clock time
    global_batch_size: int = 48
    micro_batch_size: int = 4
    micro_batch_tokens: Optional[int] = None  # token budget per length-sorted micro-batch (SFT, PPO passes)
    log_interval: int = 1
    eval_interval: Optional[int] = None  # steps; None: once per epoch
    save_interval: Optional[int] = None  # steps; None: once per epoch (and always at the end)
    keep_last: int = 2  # checkpoints kept besides "best"
    keep_epochs: list[int] = field(default_factory=list)  # epoch-end checkpoints never pruned (warm-up: [2])
    eval_accuracy: bool = True  # sft: greedy test accuracy at each evaluation + a "best" checkpoint
    resume: str = "auto"  # auto (latest in output_dir/checkpoints) | none | <checkpoint dir>
    tensorboard: bool = True
    wandb_project: Optional[str] = None  # W&B project (pip install 'megatron-reft[wandb]'); None: off
    sample_interval: int = 10  # ppo: every N steps, write rollout samples (0: never)
    num_samples: int = 4  # ppo: rollouts per sample dump
    progress_bar: bool = True
    deterministic: bool = True
    # Fault tolerance (docs/reliability.md): stop after this many consecutive non-finite
    # (skipped) steps, 0: never stop; a rank stuck in one phase this long exits, null: no watchdog.
    max_nonfinite_steps: int = 5
    hang_timeout_s: Optional[float] = 3600.0


@dataclass
class RewardSection:
    partial_reward: float = 0.1  # reft.md §3; 0 disables
    tolerance: float = 1e-2
    strict_numbers: bool = False  # True: reference float() parsing
    mcq_partial_reward: bool = False  # reference quirk for MathQA-MCQ (reward-hacking risk)
    timeout_s: float = 2.0
    num_workers: int = 2


@dataclass
class PPOSection:
    rollout_batch_size: int = 32  # prompts per rollout batch over all DP ranks (reft.md §5)
    mini_batch_size: Optional[int] = None  # sequences per optimizer step; None: full rollout batch
    ppo_epochs: int = 2  # PPO updates per rollout batch (reft.md §4)
    kl_coef: float = 0.05  # β; 0.01 for P-CoT (reft.md §4)
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 5.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eval_greedy: bool = True
    ref_offload: bool = False  # keep the reference model on CPU between uses
    logprob_chunk_tokens: int = 4096  # tokens per fp32 vocab-parallel logits chunk
    generation_micro_batch: Optional[int] = None  # prompts decoded together; None: all of this rank's
    continuous_batching: bool = False  # with generation_micro_batch: one queue, finished rows refilled
    align_prompts: str = "auto"  # ragged prompts right-aligned (true) or fed a token per step (false); auto: by spread
    old_logprobs_from_rollout: bool = False  # old log-probs/entropy/values from the rollout, no policy pass


@dataclass
class CriticSection:
    """The value model (issue 12). shared: a head on the policy's trunk (reft.md §4, default).
    separate: its own GPT trunk + head on its own ranks, layout and optimizer."""

    mode: str = "shared"  # shared | separate
    load: Optional[str] = None  # separate: checkpoint to initialise the critic from; None: model.load (fresh head)
    world_size: Optional[int] = None  # separate: ranks given to the critic (the last ones of the job)
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    lr: Optional[float] = None  # separate: critic learning rate; None: optim.lr
    weight_decay: Optional[float] = None  # None: optim.weight_decay
    clip_grad: Optional[float] = None  # None: optim.clip_grad
    micro_batch_size: Optional[int] = None  # None: trainer.micro_batch_size


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    reward: RewardSection = field(default_factory=RewardSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    critic: CriticSection = field(default_factory=CriticSection)
