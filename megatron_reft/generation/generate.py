"""Batched KV-cached sampling on the megatron-core model itself (docs/architecture.md,
"Rollout engine").

Layout: every sequence starts at cache slot 0, so a token's position is its slot index for every
sequence (RoPE and learned positions both right, no position bookkeeping, no attention mask
after the prompt). Prompts of different lengths: the shared prefix length (the shortest prompt)
is encoded in one prefill; from there the batch advances one slot per step, and a sequence
still inside its prompt is fed its own next prompt token instead of the sampled one
(megatron's own static-batching scheme). Because no pad key ever sits before a real token, this
needs no padding mask, which Transformer Engine's attention would ignore during decoding.
Cost: (longest − shortest prompt) extra single-token steps; sort prompts by length into
batches if that spread is large.

The KV cache is megatron-core's `StaticInferenceContext` (the attention layers write into it
themselves). Finished sequences are dropped from the batch (cache rows reordered) once a
quarter of the batch is finished, so they stop costing compute.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_reft.generation.sampling import SamplingParams, next_tokens
from megatron_reft.generation.stages import StageRunner

COMPACT_WHEN_ACTIVE_BELOW = 0.75  # fraction of the current batch still generating


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # response tokens per prompt; EOS included if emitted, nothing after
    finished: list[bool]  # True: stopped at EOS; False: cut at a length limit
    num_generated_tokens: int
    seconds: float
    # Decode-slot accounting: rows the model computed, summed over decode steps (one token per
    # row per step); num_generated_tokens / decode_row_steps is the share of that work that
    # produced a response token (the rest: rows still feeding their prompt, or finished rows
    # kept until the next compaction).
    decode_row_steps: int = 0

    @property
    def decode_utilisation(self) -> float:
        return self.num_generated_tokens / self.decode_row_steps if self.decode_row_steps else 0.0


def response_limits(prompts: list[list[int]], params: SamplingParams, max_positions: int | None = None) -> list[int]:
    """Per prompt: how many response tokens it may get (reft.md §5 limits)."""
    limits = []
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty")
        if params.max_prompt_length is not None and len(prompt) > params.max_prompt_length:
            raise ValueError(f"prompt {i}: {len(prompt)} tokens > max_prompt_length {params.max_prompt_length}")
        if len(prompt) >= params.max_total_length:
            raise ValueError(f"prompt {i}: {len(prompt)} tokens leave no room under "
                             f"max_total_length {params.max_total_length}")
        limit = min(params.max_new_tokens, params.max_total_length - len(prompt))
        if max_positions is not None and len(prompt) + limit - 1 > max_positions:
            raise ValueError(f"prompt {i}: {len(prompt)} + {limit} tokens exceed the model's "
                             f"{max_positions} learned positions")
        limits.append(limit)
    return limits


class _Batch:
    """Token buffer and per-sequence state; identical on every rank (driven by shared tokens).

    `rows[:n]` are the sequences (original indices) in the model's batch, in KV-cache row order.
    """

    def __init__(self, prompts: list[list[int]], limits: list[int], eos_id: int, stops_at_eos: bool, device):
        b = len(prompts)
        self.lens = torch.tensor([len(p) for p in prompts], device=device)
        self.ends = self.lens + torch.tensor(limits, device=device)  # one past the last slot
        tokens = torch.zeros(b, int(self.ends.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.tokens = tokens.to(device)
        self.generated = torch.zeros(b, dtype=torch.long, device=device)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.hit_eos = torch.zeros(b, dtype=torch.bool, device=device)
        self.rows = torch.arange(b, device=device)
        self.n = b
        self.row_steps = 0  # rows computed, summed over decode steps
        self.eos_id, self.stops_at_eos = eos_id, stops_at_eos

    @property
    def active(self) -> torch.Tensor:
        return self.rows[:self.n]

    def accept(self, sampled: torch.Tensor, slot: int) -> None:
        """Token choice for `slot` of the active rows; rows still in their prompt keep theirs."""
        rows = self.active
        writing = (self.lens[rows] <= slot) & ~self.done[rows]
        rows, tok = rows[writing], sampled[writing]
        self.tokens[rows, slot] = tok
        self.generated[rows] += 1
        eos = (tok == self.eos_id) & self.stops_at_eos
        self.hit_eos[rows] |= eos
        self.done[rows] |= eos | (slot + 1 >= self.ends[rows])

    def all_done(self) -> bool:
        return bool(self.done.all())

    def compact(self, context) -> None:
        """Move still-running rows to the front of the batch (and of the KV cache)."""
        keep = ~self.done[self.active]
        n_keep = int(keep.sum())
        if n_keep >= COMPACT_WHEN_ACTIVE_BELOW * self.n:
            return
        order = torch.cat([keep.nonzero()[:, 0], (~keep).nonzero()[:, 0],
                           torch.arange(self.n, len(self.rows), device=keep.device)])
        if context is not None and context.key_value_memory_dict:
            context.swap_key_value_dict(order)
        self.rows, self.n = self.rows[order], n_keep

    def output(self, seconds: float) -> GenerationOutput:
        lens, counts = self.lens.tolist(), self.generated.tolist()
        rows = self.tokens.tolist()
        tokens = [row[s:s + c] for row, s, c in zip(rows, lens, counts)]
        return GenerationOutput(tokens, self.hit_eos.tolist(), sum(counts), seconds, self.row_steps)


@torch.no_grad()
def generate(engine, prompts: list[list[int]], eos_id: int, params: SamplingParams,
             seed: int | None = None, *, use_cache: bool = True, progress: bool = False) -> GenerationOutput:
    """Sample a response for every prompt with this rank's model chunk (`engine.gpt`).

    Call on every rank of the model-parallel group with the same prompts; every rank returns
    the same output. Data-parallel ranks are independent (pass them different prompts and
    different seeds). Same seed, prompts and parallel layout → same samples. `seed=None`
    samples from torch's global generator. `use_cache=False` recomputes the whole sequence at
    every step (the reference the cache is tested and benchmarked against).
    """
    start = time.perf_counter()
    if not prompts:
        return GenerationOutput([], [], 0, 0.0)
    model_cfg = engine.model_config
    max_positions = model_cfg.max_position_embeddings if model_cfg.family == "opt" else None
    limits = response_limits(prompts, params, max_positions)
    gpt = engine.gpt
    was_training = gpt.training
    gpt.eval()
    try:
        stage = StageRunner(gpt, model_cfg.vocab_size)
        batch = _Batch(prompts, limits, eos_id, params.stops_at_eos, stage.device)
        generator = None
        if seed is not None and stage.is_sampler:
            generator = torch.Generator(device=stage.device).manual_seed(seed)
        _decode(stage, batch, params, generator, use_cache, progress)
    finally:
        gpt.train(was_training)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return batch.output(time.perf_counter() - start)


def _decode(stage: StageRunner, batch: _Batch, params: SamplingParams, generator, use_cache: bool,
            progress: bool) -> None:
    from megatron.core.inference.contexts import StaticInferenceContext

    slot = int(batch.lens.min())  # the slot whose token the next logits choose
    total = int(batch.ends.max())
    context = StaticInferenceContext(len(batch.rows), total) if use_cache else None
    bar = _progress_bar(total - slot, progress)
    logits = _forward(stage, batch, 0, slot, context)  # prefill of the shared prompt prefix
    while True:
        batch.row_steps += batch.n
        sampled = next_tokens(logits, params, generator) if stage.is_sampler else None
        batch.accept(stage.share(sampled, batch.n), slot)
        slot += 1
        bar.update(1)
        if batch.all_done():
            break
        batch.compact(context)
        if use_cache:
            logits = _forward(stage, batch, slot - 1, slot, context)
        else:
            logits = _forward(stage, batch, 0, slot, None)
    bar.close()


def _forward(stage: StageRunner, batch: _Batch, begin: int, end: int, context):
    """Feed slots [begin, end) of the active rows (begin > 0 only with a cache holding the rest)."""
    tokens = batch.tokens[batch.active, begin:end]
    positions = torch.arange(begin, end, device=tokens.device).expand_as(tokens)
    # No mask tensor: the prefill (begin = 0, no padding before any real token — see the module
    # docstring) is plain causal attention, which the layer spec applies itself (SDPA: is_causal);
    # one new position sees the whole cache. Only single-token steps ever follow the prefill.
    mask = None
    if context is not None:
        context.sequence_len_offset = begin
        if begin > 0:
            context.enable_decode_mode()
    return stage.last_logits(tokens, positions, mask, context)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    return tqdm(total=total, disable=not (enabled and rank0), desc="generate", unit="step", leave=False)
