"""Per-GPU memory plan for a config: `megatron-reft plan --config FILE [key=value ...]`.

Answers "will this layout fit?" before any job time is spent. Everything is per GPU (one rank)
on the heaviest pipeline stage, in bytes; the table prints GiB. The formulas (docs/slurm.md,
"Memory plan" and docs/benchmarks.md) follow what this code base allocates:

- weights: the rank's parameters × 2 bytes (bf16) or 4 (fp32). Transformer layers split over
  TP and PP; the (padded) embedding sits on the first stage and the output layer on the last
  (tied embeddings under PP>1: a copy on both). Norms and row-parallel biases are replicated.
- gradients: megatron DDP keeps fp32 main gradients (grad_reduce_in_fp32) for every parameter
  of the rank, with or without the distributed optimizer: 4 bytes/param.
- optimizer: Adam in mixed precision keeps fp32 master weights + two moments = 12 bytes/param
  (fp32 training: 8, no master copy); the distributed optimizer divides this by DP.
- activations per micro-batch and layer (Korthikanti et al. 2022, adapted to dropout 0, GQA and
  gated MLPs; s = sequence, b = micro-batch, h = hidden, f = FFN, kv = query groups × head dim,
  a = bytes per activation, t = TP, n = heads):
      s·b·a·[4h + (2h + 2kv_saved + h_ctx)/t + m·f/t] + attention scores
  4h: both norms' inputs and outputs (÷t with sequence parallelism); Q, K, V, attention output;
  m·f: MLP intermediates (SwiGLU fused 3, unfused 4; GELU 2). Attention scores: flash/fused
  attention (Transformer Engine) keeps none; the local spec keeps the fp32 softmax output and
  its bf16 copy: n/t·s²·b·(4 + a) bytes, and repeats K/V to all heads.
  Full recomputation keeps only each layer's input (s·b·h·a) plus one layer rebuilt in backward.
  Under pipeline parallelism the first stage holds min(PP, micro-batches) micro-batches (1F1B).
- logits: computed in chunks of ppo.logprob_chunk_tokens positions×batch, never whole:
  chunk × V/t × 22 bytes (bf16 logits + up to five fp32 working copies).
- KV cache (PPO rollouts, eval): 2 · layers/PP · groups/t · head_dim · (prompt+response) ·
  prompts per rank · a bytes, megatron's static inference context.
- reference model (PPO): the policy's weights again (bf16), 0 with ppo.ref_offload.
- value head: h+1 parameters, negligible.
- runtime overhead: CUDA context, NCCL buffers, cuBLAS workspaces, allocator slack: a fixed
  RUNTIME_OVERHEAD_GIB.

PPO's peak is the resident state plus the larger of its two phases (rollout generation; PPO
update), which never overlap.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

GIB = float(2**30)
RUNTIME_OVERHEAD_GIB = 2.5
WARN_FRACTION = 0.90  # warn above this share of the GPU: fragmentation lives in the last 10%
LOGIT_BYTES_PER_ELEMENT = 2 + 5 * 4
EVAL_BATCH = 32  # evaluation.run.greedy_accuracy decodes this many prompts per rank at once


# ---------------------------------------------------------------- parameters
@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp


def layer_parameters(model, tp: int) -> float:
    """Parameters of one transformer layer on one TP rank."""
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_query_groups * model.head_dim
    sharded = h * (h + 2 * kv) + h * h + (3 if model.gated else 2) * h * f
    replicated = 2 * h if model.family == "llama" else 4 * h  # norm weights (+ biases for OPT)
    if model.add_bias:
        sharded += (h + 2 * kv) + (2 if model.gated else 1) * f  # column-parallel biases
        replicated += 2 * h  # row-parallel biases (attention output, fc2)
    return sharded / tp + replicated


def stage_parameters(model, tp: int, pp: int) -> dict:
    """Parameters per rank on the first and last pipeline stage, and the larger of the two."""
    h = model.hidden_size
    layers = model.num_layers // pp * layer_parameters(model, tp)
    vocab = model.padded_vocab_size(tp) * h / tp
    positions = model.max_position_embeddings * h if model.family == "opt" else 0
    final_norm = h if model.family == "llama" else 2 * h
    first = layers + vocab + positions
    # Untied: an output layer of its own. Tied: shared at PP=1, a copy on the last stage otherwise.
    output = vocab if (not model.tie_embeddings or pp > 1) else 0
    if pp == 1:
        first = last = first + output + final_norm
    else:
        last = layers + output + final_norm
    return {"first": first, "last": last, "max": max(first, last)}


# ---------------------------------------------------------------- activations
def layer_activation_bytes(model, seq: int, batch: int, tp: int, *, act_bytes: int = 2,
                           attention: str = "flash", sequence_parallel: bool = False,
                           fused_swiglu: bool = True, norm_saved_bytes: float | None = None) -> float:
    """Bytes one transformer layer keeps for backward, for one micro-batch (see module doc).

    GPU defaults (fused norms keep their bf16 input, fused SwiGLU). The CPU path differs in two
    measured places, exposed for the test that checks this formula against saved tensors:
    torch's composite RMSNorm keeps fp32 copies (norm_saved_bytes=8) and the unfused SwiGLU
    keeps five f-wide tensors instead of three.
    """
    h, f, a = model.hidden_size, model.ffn_hidden_size, act_bytes
    kv = model.num_query_groups * model.head_dim
    tokens = seq * batch
    norm_in = a if norm_saved_bytes is None else norm_saved_bytes
    # Both norms' inputs and outputs (the outputs are the QKV/FC1 inputs); ÷TP only with SP.
    replicated = 2 * (norm_in + a) * h / (tp if sequence_parallel and tp > 1 else 1)
    kv_saved = 2 * h if attention == "local" else 2 * kv  # local spec repeats K/V to every head
    attention_tensors = a * (h + kv_saved + h) / tp  # Q, K, V, attention output (= projection input)
    if model.gated:  # fc1 output (2f) + activation output (f); unfused also silu(x) and a copy
        mlp = a * (3 if fused_swiglu else 5) * f / tp
    else:
        mlp = a * 2 * f / tp  # GELU input and output
    total = tokens * (replicated + attention_tensors + mlp)
    if attention == "local":
        softmax_bytes = 4 + (a if a != 4 else 0)  # fp32 softmax output + its cast for the matmul
        total += model.num_attention_heads / tp * seq * seq * batch * softmax_bytes
    return total


def training_activation_bytes(model, layout: Layout, seq: int, micro: int, microbatches: int, *,
                              recompute: bool, act_bytes: int, attention: str,
                              sequence_parallel: bool, fused_swiglu: bool = True) -> float:
    """Activations held at the peak of a forward/backward pass on the first pipeline stage."""
    one_layer = layer_activation_bytes(model, seq, micro, layout.tp, act_bytes=act_bytes,
                                       attention=attention, sequence_parallel=sequence_parallel,
                                       fused_swiglu=fused_swiglu)
    layers = model.num_layers // layout.pp
    in_flight = min(layout.pp, max(microbatches, 1))  # 1F1B warm-up depth on stage 0
    if recompute:
        split = layout.tp if sequence_parallel and layout.tp > 1 else 1
        per_microbatch = layers * seq * micro * model.hidden_size * act_bytes / split
        return in_flight * per_microbatch + one_layer
    return in_flight * layers * one_layer


def logits_bytes(model, tp: int, tokens: int, chunk_tokens: int) -> float:
    """Transient fp32 logits of one chunk (engine: vocab-parallel, chunked, recomputed)."""
    return min(tokens, chunk_tokens) * model.padded_vocab_size(tp) / tp * LOGIT_BYTES_PER_ELEMENT


def kv_cache_bytes(model, layout: Layout, seq: int, prompts: int, act_bytes: int) -> float:
    groups = max(1, model.num_query_groups // layout.tp)
    return 2 * (model.num_layers // layout.pp) * groups * model.head_dim * seq * prompts * act_bytes


def prefill_bytes(model, tp: int, prompt_len: int, prompts: int, act_bytes: int, attention: str) -> float:
    """Transient working set of one layer while encoding prompts without gradients."""
    tokens = prompt_len * prompts
    mlp = tokens * (2 if model.gated else 1) * model.ffn_hidden_size / tp * act_bytes
    scores = 0.0
    if attention == "local":
        scores = model.num_attention_heads / tp * prompt_len ** 2 * prompts * (4 + act_bytes)
    return mlp + scores


# ---------------------------------------------------------------- the plan
@dataclass
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    job: str
    model: str
    layout: Layout
    resident: list = field(default_factory=list)  # Items alive for the whole job
    phases: dict = field(default_factory=dict)  # phase name → Items alive only then
    capacity_gib: float | None = None
    assumptions: list = field(default_factory=list)
    critic: "MemoryPlan | None" = None  # a separate critic on ranks of its own (its GPUs' plan)

    def phase_bytes(self, phase: str) -> float:
        return sum(i.bytes for i in self.phases[phase])

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_bytes)

    @property
    def total_bytes(self) -> float:
        return sum(i.bytes for i in self.resident) + self.phase_bytes(self.peak_phase)

    @property
    def total_gib(self) -> float:
        return self.total_bytes / GIB

    def as_dict(self) -> dict:
        gib = lambda items: {i.name: round(i.bytes / GIB, 3) for i in items}  # noqa: E731
        critic = {"critic": self.critic.as_dict()} if self.critic is not None else {}
        return {**critic, "job": self.job, "model": self.model, "layout": dataclasses.asdict(self.layout),
                "resident_gib": gib(self.resident),
                "phases_gib": {p: gib(items) for p, items in self.phases.items()},
                "peak_phase": self.peak_phase, "total_gib": round(self.total_gib, 3),
                "capacity_gib": self.capacity_gib, "fits": self.fits(),
                "assumptions": self.assumptions}

    def fits(self) -> bool | None:
        if self.capacity_gib is None:
            return None
        return self.total_gib <= self.capacity_gib and (self.critic is None or bool(self.critic.fits()))

    def table(self) -> str:
        L = self.layout
        lines = [f"memory plan: {self.job} · {self.model} · TP={L.tp} PP={L.pp} DP={L.dp} "
                 f"(world {L.world}) · per GPU, heaviest pipeline stage",
                 f"{'':2}{'item':<34}{'GiB':>9}  note"]
        for item in self.resident:
            lines.append(f"{'':2}{item.name:<34}{item.bytes / GIB:>9.2f}  {item.note}")
        for phase, items in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"  [{phase}: {self.phase_bytes(phase) / GIB:.2f} GiB{mark}]")
            for item in items:
                lines.append(f"{'':4}{item.name:<32}{item.bytes / GIB:>9.2f}  {item.note}")
        capacity = ("unknown (set parallel.gpu_memory_gb)" if self.capacity_gib is None
                    else f"{self.capacity_gib:.1f} GiB")
        verdict = {None: "", True: " -> fits", False: " -> DOES NOT FIT"}[self.fits()]
        lines.append(f"  {'total (resident + peak phase)':<34}{self.total_gib:>9.2f}  of {capacity}{verdict}")
        lines += [f"  assumption: {a}" for a in self.assumptions]
        if self.critic is not None:
            lines += ["", self.critic.table()]
        return "\n".join(lines)


def attention_kind(config, override: str = "auto") -> str:
    """'flash' (Transformer Engine fused attention: no score matrix kept) or 'local'."""
    if override != "auto":
        return override
    choice = str(config.model.use_te).lower()
    if choice in ("true", "false"):
        return "flash" if choice == "true" else "local"
    from importlib.util import find_spec

    return "flash" if find_spec("transformer_engine") is not None else "local"


def _weight_bytes(config) -> int:
    return 4 if str(config.model.dtype).lower() == "fp32" else 2  # "auto" is bf16 on a GPU


def _state_items(config, model, layout: Layout, params: float, optimizer: bool) -> list:
    w = _weight_bytes(config)
    items = [Item("weights", params * w, f"{params / 1e9:.3f}B params/rank × {w} B")]
    if optimizer:
        dist_opt = config.parallel.use_distributed_optimizer
        per_param = 8 if w == 4 else 12
        shard = layout.dp if dist_opt else 1
        items.append(Item("gradients (fp32 main grads)", params * 4, "4 B/param, not sharded"))
        note = (f"{per_param} B/param ÷ DP={layout.dp} (distributed optimizer)" if dist_opt
                else f"{per_param} B/param (plain optimizer; distributed would divide by DP={layout.dp})")
        items.append(Item("optimizer state (Adam)", params * per_param / shard, note))
    return items


def _training_items(config, model, layout: Layout, seq: int, micro: int, microbatches: int,
                    attention: str) -> list:
    a = _weight_bytes(config)
    recompute = config.model.recompute
    sp = config.parallel.sequence_parallel
    acts = training_activation_bytes(model, layout, seq, micro, microbatches, recompute=recompute,
                                     act_bytes=a, attention=attention, sequence_parallel=sp)
    in_flight = min(layout.pp, max(microbatches, 1))
    how = "full recompute" if recompute else "no recompute"
    chunk = config.ppo.logprob_chunk_tokens
    return [Item("activations", acts, f"s={seq} b={micro} × {model.num_layers // layout.pp} layers, "
                                      f"{in_flight} micro-batch(es) in flight, {how}, {attention} attention"),
            Item("logits chunk (fp32)", logits_bytes(model, layout.tp, seq * micro, chunk),
                 f"{min(seq * micro, chunk)} tokens × V/TP={model.padded_vocab_size(layout.tp) // layout.tp}")]


def _generation_items(config, model, layout: Layout, prompts: int, attention: str, cache_factor: int = 1) -> list:
    """`cache_factor` 2: continuous batching keeps 2 × max_total_length slots per row
    (generation/continuous.py: rows shift left when the cache end is reached)."""
    d, a = config.data, _weight_bytes(config)
    slots = cache_factor * d.max_total_length
    return [Item("KV cache", kv_cache_bytes(model, layout, slots, prompts, a),
                 f"{prompts} prompts × {slots} tokens × "
                 f"{max(1, model.num_query_groups // layout.tp)} KV heads/rank"),
            Item("prefill working set", prefill_bytes(model, layout.tp, d.max_prompt_length, prompts, a, attention),
                 f"one layer, {prompts} × {d.max_prompt_length} prompt tokens")]


def make_plan(config, model, job: str, world_size: int | None = None, *, attention: str = "auto",
              capacity_gib: float | None = None) -> MemoryPlan:
    """The per-GPU plan for `job` (sft | ppo | eval) under config's layout."""
    p, t, ppo = config.parallel, config.trainer, config.ppo
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    critic_ranks = _critic_ranks(config) if job == "ppo" else 0
    world = world_size or p.planned_world_size or tp * pp + critic_ranks
    layout = Layout(tp, pp, max(1, (world - critic_ranks) // (tp * pp)))
    attention = attention_kind(config, attention)
    params = stage_parameters(model, tp, pp)["max"]
    plan = MemoryPlan(job, model.preset or model.family, layout,
                      capacity_gib=capacity_gib if capacity_gib is not None else p.gpu_memory_gb)
    plan.resident = _state_items(config, model, layout, params, optimizer=job != "eval")
    if job == "sft":
        per_rank = t.global_batch_size // layout.dp
        plan.phases["train"] = _training_items(config, model, layout, config.data.max_length, t.micro_batch_size,
                                               per_rank // t.micro_batch_size, attention)
    elif job == "ppo":
        if not ppo.ref_offload:
            plan.resident.append(Item("reference model (frozen)", params * _weight_bytes(config),
                                      "bf16 copy of the policy"))
        per_rank = max(1, ppo.rollout_batch_size // layout.dp)
        prompts = ppo.generation_micro_batch or per_rank
        continuous = ppo.continuous_batching and prompts < per_rank
        plan.phases["rollout"] = _generation_items(config, model, layout, prompts, attention, 2 if continuous else 1)
        mini = (ppo.mini_batch_size or ppo.rollout_batch_size) // layout.dp
        plan.phases["update"] = _training_items(config, model, layout, config.data.max_total_length,
                                                t.micro_batch_size, mini // t.micro_batch_size, attention)
        if config.critic.mode == "separate" and not critic_ranks:  # on these GPUs, beside the policy
            plan.resident += [Item(f"critic {i.name}", i.bytes, i.note)
                              for i in _state_items(config, model, layout, _critic_parameters(model, tp, pp),
                                                    optimizer=True)]
        elif critic_ranks:
            plan.critic = _critic_plan(config, model, critic_ranks, attention, plan.capacity_gib)
    elif job == "eval":
        plan.phases["generation"] = _generation_items(config, model, layout, EVAL_BATCH, attention)
    else:
        raise ValueError(f"unknown job {job!r} (sft, ppo or eval)")
    plan.resident.append(Item("runtime overhead", RUNTIME_OVERHEAD_GIB * GIB, "CUDA context, NCCL, workspaces, slack"))
    plan.assumptions = _assumptions(config, attention, world_size, layout)
    return plan


def _critic_ranks(config) -> int:
    c = config.critic
    return (c.world_size or 0) if c.mode == "separate" else 0


def _critic_parameters(model, tp: int, pp: int) -> float:
    """A value-only model (engine.py): an untied output layer is frozen, so it costs weights only;
    counted here as trainable (an upper bound of 12+4 B/param on a vocab × hidden/TP matrix)."""
    return stage_parameters(model, tp, pp)["max"]


def _critic_plan(config, model, ranks: int, attention: str, capacity_gib) -> MemoryPlan:
    """The critic's GPUs: its trunk + head with optimizer at its own TP x PP, training on its DP
    share of each mini-batch; no KV cache, no logits (value-only forward)."""
    c, t, ppo = config.critic, config.trainer, config.ppo
    layout = Layout(c.tensor_model_parallel_size, c.pipeline_model_parallel_size,
                    max(1, ranks // (c.tensor_model_parallel_size * c.pipeline_model_parallel_size)))
    plan = MemoryPlan("ppo critic", model.preset or model.family, layout, capacity_gib=capacity_gib)
    params = _critic_parameters(model, layout.tp, layout.pp)
    plan.resident = _state_items(config, model, layout, params, optimizer=True)
    micro = c.micro_batch_size or t.micro_batch_size
    mini = max(1, (ppo.mini_batch_size or ppo.rollout_batch_size) // layout.dp)
    training = _training_items(config, model, layout, config.data.max_total_length, micro,
                               max(1, mini // micro), attention)
    plan.phases["update"] = [i for i in training if not i.name.startswith("logits")]
    plan.resident.append(Item("runtime overhead", RUNTIME_OVERHEAD_GIB * GIB, "CUDA context, NCCL, workspaces, slack"))
    return plan


def _assumptions(config, attention: str, world_size, layout: Layout) -> list:
    precision = "bf16" if _weight_bytes(config) == 2 else "fp32"
    kernel = ("Transformer Engine fused, no score matrix" if attention == "flash"
              else "local spec, scores materialised")
    notes = [f"{precision} weights and activations (model.dtype={config.model.dtype})",
             f"attention: {attention} ({kernel}; choose with model.use_te or --attention)"]
    if not world_size and not config.parallel.planned_world_size:
        notes.append(f"world size unknown: DP={layout.dp} assumed (set parallel.planned_world_size or --world-size)")
    return notes


# ---------------------------------------------------------------- validation hook
def _suggestions(config, layout: Layout, job: str) -> str:
    tips = []
    if not config.parallel.use_distributed_optimizer and layout.dp > 1:
        tips.append("parallel.use_distributed_optimizer=true")
    if not config.model.recompute:
        tips.append("model.recompute=true")
    if config.trainer.micro_batch_size > 1:
        tips.append("a smaller trainer.micro_batch_size")
    if job == "ppo" and not config.ppo.ref_offload:
        tips.append("ppo.ref_offload=true")
    tips.append("a larger TP or PP")
    return ", ".join(tips)


def check_fits(config, model, job: str = "sft", world_size: int | None = None) -> list[str]:
    """Errors (one line, naming the key) when the plan exceeds parallel.gpu_memory_gb; a
    warning on stderr when it comes within WARN_FRACTION of it. Skipped when the size is unset."""
    if config.parallel.gpu_memory_gb is None or job not in ("sft", "ppo", "eval"):
        return []
    plan = make_plan(config, model, job, world_size)
    need, have = plan.total_gib, config.parallel.gpu_memory_gb
    summary = (f"the {job} memory plan needs {need:.1f} GiB per GPU at TP={plan.layout.tp} PP={plan.layout.pp} "
               f"DP={plan.layout.dp}")
    if plan.critic is not None and plan.critic.total_gib > have:
        L = plan.critic.layout
        return [f"critic.world_size: the critic's memory plan needs {plan.critic.total_gib:.1f} GiB per GPU at "
                f"TP={L.tp} PP={L.pp} DP={L.dp} but the GPU has {have:g} GiB (see `megatron-reft plan`); "
                "give the critic a larger critic.tensor_model_parallel_size / pipeline_model_parallel_size"]
    if need > have:
        return [f"parallel.gpu_memory_gb: {summary} but the GPU has {have:g} GiB "
                f"(see `megatron-reft plan`); try {_suggestions(config, plan.layout, job)}"]
    if need > WARN_FRACTION * have and _is_rank0():
        print(f"config warning: parallel.gpu_memory_gb: {summary}, over {WARN_FRACTION:.0%} of {have:g} GiB",
              file=sys.stderr)
    return []


def _is_rank0() -> bool:
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


# ---------------------------------------------------------------- command line
FILE_KEYS = ("data.train_file:", "data.eval_file:", "data.tokenizer:", "model.load:")


def _model_for_plan(config):
    """The architecture: model.load's model.yaml when it exists, else the preset/fields (so a
    recipe can be planned before its checkpoint is downloaded)."""
    from megatron_reft.config import resolve_model_config

    if config.model.load and not (Path(config.model.load) / "model.yaml").is_file():
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, load=None))
    return resolve_model_config(config)


def guess_job(path: str | None) -> str:
    name = Path(path or "").name.lower()
    return "ppo" if "ppo" in name else "eval" if "eval" in name else "sft"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-reft plan", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("--job", choices=("auto", "sft", "ppo", "eval"), default="auto",
                        help="auto: ppo/eval when the file name says so, else sft")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs in the job (default: launcher env, else parallel.planned_world_size)")
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="GiB per GPU (default parallel.gpu_memory_gb)")
    parser.add_argument("--attention", choices=("auto", "flash", "local"), default="auto")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config first")
    parser.add_argument("--skip-file-checks", action="store_true",
                        help="do not require data/checkpoint files to exist (planning ahead)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    return parser


def main(argv=None) -> int:
    import yaml

    from megatron_reft.config import ConfigError, load_config, to_dict, validate, world_size_from_env

    args = _parser().parse_intermixed_args(argv)
    job = guess_job(args.config) if args.job == "auto" else args.job
    try:
        config = load_config(args.config, args.overrides)
        if args.gpu_memory_gb is not None:
            config.parallel.gpu_memory_gb = args.gpu_memory_gb
        if args.attention != "auto":  # the same choice for the table and the validation below
            config.model.use_te = "true" if args.attention == "flash" else "false"
        model = _model_for_plan(config)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"config error:\n{err}", file=sys.stderr)
        return 2
    world = args.world_size or world_size_from_env()
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip())
    plan = make_plan(config, model, job, world)
    print(json.dumps(plan.as_dict(), indent=1) if args.json else plan.table())
    try:
        critic_ranks = _critic_ranks(config) if job == "ppo" else 0
        validate(config, model, job=job,
                 world_size=world or config.parallel.planned_world_size or plan.layout.world + critic_ranks)
    except ConfigError as err:
        lines = [line for line in str(err).splitlines()
                 if not (args.skip_file_checks and line.startswith(FILE_KEYS))]
        if lines:
            print("config error:\n" + "\n".join(lines), file=sys.stderr)
            return 2
    return 0
