"""Batched KV-cached sampling on the megatron-core model itself (docs/architecture.md,
"Rollout engine").

Layout: every sequence starts at cache slot 0, so a token's position is its slot index for every
sequence (RoPE and learned positions both right, no position bookkeeping, no attention mask
after the prompt). Prompts of different lengths, two ways:

- fed (megatron's own static-batching scheme): the shared prefix (the shortest prompt) is encoded
  in one prefill; from there the batch advances one slot per step, and a sequence still inside
  its prompt is fed its own next prompt token instead of the sampled one. No pad key ever sits
  before a real token, so no padding mask is needed — which Transformer Engine's attention would
  ignore during decoding. Cost: (longest − shortest prompt) extra full-batch decode steps.
- right-aligned (when the attention honours a decode-time mask — the local layer spec's — and
  the spread is worth it, `_aligning`): all prompts are prefilled at once and copied into
  the cache so that they end at the same slot (generation/continuous.py `right_align_prompts`);
  each row then starts at its own slot (`_Batch.start`), feeds its own positions and masks the
  slots before its start — the continuous-batching step. Real GSM8K prompts spread over ~100
  tokens, so this removes up to that many full-batch steps per rollout. Greedy tokens are the
  fed scheme's; sampled tokens are reproducible per seed (with or without the cache: the uncached
  path recomputes the same layout) but are not the fed scheme's draws.

The KV cache is megatron-core's `StaticInferenceContext` (the attention layers write into it
themselves). Finished sequences are dropped from the batch (cache rows reordered) once a
quarter of the batch is finished, so they stop costing compute.

Continuous batching (`slots=` fewer than the prompts; generation/continuous.py): the batch holds
`slots` cache rows; a waiting prompt is admitted into a finished sequence's row while the others
keep decoding, so the decode batch stays full until the queue drains. Each sequence then has its
own start slot in the cache (`_Batch.start`); its tokens are addressed in its own coordinates.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_reft.generation.continuous import (admit_waiting, continuous_cache_length, right_align_prompts,
                                                 shift_cache)
from megatron_reft.generation.sampling import NO_TOKEN, SamplingParams, next_tokens
from megatron_reft.generation.stages import SCORES, StageRunner
from megatron_reft.generation.static_step import StaticDecoder, supports_static_step
from megatron_reft.reliability.errors import NonFiniteError

COMPACT_WHEN_ACTIVE_BELOW = 0.75  # fraction of the current batch still generating
ALIGN_WHEN_SPREAD_OVER = 4  # right-align prompts when their length spread ≥ 1/4 of the decode steps


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
    # Decode slots the batch was sized for, summed over decode steps (its starting width per
    # step, `slots` with continuous batching): rows not computed after a compaction are idle slots.
    decode_slot_steps: int = 0
    # generate(..., return_logprobs=True): per response token, aligned with `tokens` — the
    # log-prob of the sampled token and the entropy under the policy's full distribution at the
    # engine's scoring temperature (before top-k/top-p), and the value head's output on the same
    # hidden state (None without a value head). The training forward's old log-probs, entropy and
    # values at the action positions (rl/trainer.py, ppo.old_logprobs_from_rollout).
    logprobs: list[list[float]] | None = None
    entropies: list[list[float]] | None = None
    values: list[list[float]] | None = None

    @property
    def decode_utilisation(self) -> float:
        return self.num_generated_tokens / self.decode_row_steps if self.decode_row_steps else 0.0

    @property
    def slot_occupancy(self) -> float:
        return self.num_generated_tokens / self.decode_slot_steps if self.decode_slot_steps else 0.0


def response_limits(prompts: list[list[int]], params: SamplingParams, max_positions: int | None = None,
                    caps: list[int] | None = None) -> list[int]:
    """Per prompt: how many response tokens it may get (reft.md §5 limits; `caps`: a further
    per-prompt cap, e.g. benchmarks replaying realistic response lengths)."""
    if caps is not None and len(caps) != len(prompts):
        raise ValueError(f"{len(caps)} response caps for {len(prompts)} prompts")
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
        if caps is not None:
            if caps[i] < 1:
                raise ValueError(f"prompt {i}: response cap {caps[i]} < 1")
            limit = min(limit, caps[i])
        if max_positions is not None and len(prompt) + limit - 1 > max_positions:
            raise ValueError(f"prompt {i}: {len(prompt)} + {limit} tokens exceed the model's "
                             f"{max_positions} learned positions")
        limits.append(limit)
    return limits


class _Batch:
    """Token buffer and per-sequence state; identical on every rank (driven by shared tokens).

    `rows[:n]` are the sequences (original indices) in the model's batch, in KV-cache row order;
    `waiting` the sequences not yet admitted (continuous batching). A sequence's slot j sits at
    cache slot `start + j` (start 0 for every sequence of the first batch).
    """

    def __init__(self, prompts: list[list[int]], limits: list[int], eos_id: int, stops_at_eos: bool, device,
                 slots: int | None = None, scored: bool = False):
        b = len(prompts)
        self.lens = torch.tensor([len(p) for p in prompts], device=device)
        self.ends = self.lens + torch.tensor(limits, device=device)  # one past the last slot
        tokens = torch.zeros(b, int(self.ends.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        self.tokens = tokens.to(device)
        # per token slot: log-prob, entropy, value of the token sampled there (return_logprobs)
        self.scores = torch.zeros(b, tokens.shape[1], SCORES, device=device) if scored else None
        self.generated = torch.zeros(b, dtype=torch.long, device=device)
        self.done = torch.zeros(b, dtype=torch.bool, device=device)
        self.hit_eos = torch.zeros(b, dtype=torch.bool, device=device)
        self.start = torch.zeros(b, dtype=torch.long, device=device)
        self.width = b if slots is None else min(b, slots)  # cache rows
        self.rows = torch.arange(self.width, device=device)
        self.n = self.width
        self.waiting = list(range(self.width, b))
        self.row_steps = 0  # rows computed, summed over decode steps
        self.slot_steps = 0  # cache rows available, summed over decode steps
        self.eos_id, self.stops_at_eos = eos_id, stops_at_eos
        self._own_slots = None  # rows_at_own_slots, cached
        self.running = self.n  # rows not finished, as of the last step_finished

    @property
    def active(self) -> torch.Tensor:
        return self.rows[:self.n]

    def local(self, slot: int) -> torch.Tensor:
        """Each active row's own slot for cache slot `slot`."""
        return slot - self.start[self.active]

    def choosing(self, slot: int) -> torch.Tensor:
        """[n] bool: the active rows whose token for cache slot `slot` is sampled (past their
        prompt, not finished) — the rows `accept` writes."""
        rows = self.active
        return (self.lens[rows] <= self.local(slot)) & ~self.done[rows]

    def accept(self, sampled: torch.Tensor, slot: int, scores: torch.Tensor | None = None) -> None:
        """Token choice (and its scores) for cache slot `slot` of the active rows; rows still in
        their prompt, or finished, keep theirs. Written without boolean indexing, whose result
        size the host must read (on a GPU, a wait for the whole queue per use): every active row
        writes, a row that does not choose writes its own token back. Non-finite logits are
        counted here and reported by `step_finished`, the step's one read."""
        rows, local = self.active, self.local(slot)
        writing = self.choosing(slot)
        at = local.clamp(0, self.tokens.shape[1] - 1)  # non-choosing rows only: written back unchanged
        self.tokens[rows, at] = torch.where(writing, sampled, self.tokens[rows, at])
        if scores is not None:
            self.scores[rows, at] = torch.where(writing[:, None], scores, self.scores[rows, at])
        self.generated[rows] += writing
        eos = writing & (sampled == self.eos_id) if self.stops_at_eos else torch.zeros_like(writing)
        self.hit_eos[rows] |= eos
        self.done[rows] |= eos | (writing & (local + 1 >= self.ends[rows]))
        self._step = (slot, writing.sum(), (writing & (sampled == NO_TOKEN)).sum())

    def step_finished(self) -> bool:
        """After `accept`: whether every sequence is finished — the decode step's one read of
        device values, which also brings the number of rows still running (for `compact`) and
        raises on non-finite logits."""
        slot, chose, diverged = self._step
        status = torch.stack([self.done.all().long(), (~self.done[self.active]).sum(), chose, diverged]).tolist()
        finished, self.running, chose, diverged = status
        if diverged:
            raise NonFiniteError(f"generation: the policy's next-token logits are not finite (NaN or inf) for "
                                 f"{diverged} of {chose} sequences at position {slot}: "
                                 "its weights or activations diverged")
        return bool(finished)

    def rows_at_own_slots(self) -> bool:
        """Whether an active row starts past cache slot 0 (prompts right-aligned, or admitted
        later). Cached until rows or starts change (`moved`): reading it is a GPU sync."""
        if self._own_slots is None:
            self._own_slots = bool(self.start[self.active].any())
        return self._own_slots

    def moved(self) -> None:
        """Rows or their start slots changed."""
        self._own_slots = None

    def compact(self, context, filled: int) -> None:
        """Move still-running rows to the front of the batch (and of the KV cache, whose slots
        [0, filled) hold keys). `self.running`: from this step's `step_finished`."""
        if self.waiting:  # continuous batching refills finished rows in place instead
            return
        if self.running >= COMPACT_WHEN_ACTIVE_BELOW * self.n:
            return
        keep = ~self.done[self.active]
        kept = keep.nonzero()[:, 0]
        order = torch.cat([kept, (~keep).nonzero()[:, 0],
                           torch.arange(self.n, len(self.rows), device=keep.device)])
        if context is not None and context.key_value_memory_dict:
            move_cache_rows_to_front(context, kept, filled)
        self.rows, self.n = self.rows[order], self.running
        self.moved()

    def output(self, seconds: float, with_values: bool = False) -> GenerationOutput:
        lens, counts = self.lens.tolist(), self.generated.tolist()
        responses = lambda table: [row[s:s + c] for row, s, c in zip(table.tolist(), lens, counts)]
        out = GenerationOutput(responses(self.tokens), self.hit_eos.tolist(), sum(counts), seconds,
                               self.row_steps, self.slot_steps)
        if self.scores is not None:
            out.logprobs, out.entropies = responses(self.scores[..., 0]), responses(self.scores[..., 1])
            out.values = responses(self.scores[..., 2]) if with_values else None
        return out


@torch.no_grad()
def generate(engine, prompts: list[list[int]], eos_id: int, params: SamplingParams,
             seed: int | None = None, *, use_cache: bool = True, progress: bool = False,
             slots: int | None = None, response_caps: list[int] | None = None,
             return_logprobs: bool = False, align_prompts: bool | None = None,
             static_decode: bool = False) -> GenerationOutput:
    """Sample a response for every prompt with this rank's model chunk (`engine.gpt`).

    Call on every rank of the model-parallel group with the same prompts; every rank returns
    the same output. Data-parallel ranks are independent (pass them different prompts and
    different seeds). Same seed, prompts and parallel layout → same samples. `seed=None`
    samples from torch's global generator. `use_cache=False` recomputes the whole sequence at
    every step (the reference the cache is tested and benchmarked against).

    `slots` (continuous batching): decode at most this many sequences at once and admit waiting
    prompts into the rows of finished ones (KV cache sized by `slots`, not by the prompts). Greedy
    tokens equal the static engine's; sampled tokens are reproducible for the same seed and
    `slots` but not the static engine's draws (rows share one generator in batch order).
    `response_caps`: per-prompt caps on the response length (on top of `params`).
    `return_logprobs`: also return each sampled token's log-prob and entropy at the engine's
    scoring temperature (`engine.temperature`, the one its training forward uses — not
    `params.temperature`, and before top-k/top-p: PPO's ratio compares the same quantity) and the
    value head's output (GenerationOutput.logprobs / entropies / values).
    `align_prompts`: right-align prompts of different lengths (True), feed them a token per step
    (False), or choose by cost (None); only where the attention masks while decoding (module doc).
    `static_decode`: decode steps at fixed shapes (generation/static_step.py), replayed as CUDA
    graphs on a GPU with one model-parallel rank, run eagerly elsewhere; needs one pipeline stage
    and the local SDPA layer spec. Greedy tokens equal the default step's; logits equal it to
    rounding (attention over the whole cache).
    """
    if slots is not None and slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if slots is not None and not use_cache:
        raise ValueError("continuous batching (slots=) needs the KV cache (use_cache=True)")
    start = time.perf_counter()
    if not prompts:
        empty = [] if return_logprobs else None
        return GenerationOutput([], [], 0, 0.0, logprobs=empty, entropies=empty, values=empty)
    model_cfg = engine.model_config
    max_positions = model_cfg.max_position_embeddings if model_cfg.family == "opt" else None
    limits = response_limits(prompts, params, max_positions, response_caps)
    gpt = engine.gpt
    was_training = gpt.training
    gpt.eval()
    try:
        stage = StageRunner(gpt, model_cfg.vocab_size)
        if static_decode:
            _check_static_decode(stage, use_cache)
        if slots is not None and not stage.masks_while_decoding:
            raise ValueError("continuous batching (slots=) needs an attention that applies a padding mask "
                             "while decoding: the local layer spec's (model.use_te: false), not Transformer "
                             "Engine's")
        batch = _Batch(prompts, limits, eos_id, params.stops_at_eos, stage.device, slots, scored=return_logprobs)
        with_values = return_logprobs and stage.has_value_head()
        generator = None
        if seed is not None and stage.is_sampler:
            generator = torch.Generator(device=stage.device).manual_seed(seed)
        score_temperature = getattr(engine, "temperature", 1.0) if return_logprobs else None
        _decode(stage, batch, params, generator, use_cache, progress, score_temperature, align_prompts,
                static_decode)
    finally:
        gpt.train(was_training)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return batch.output(time.perf_counter() - start, with_values)


def _decode(stage: StageRunner, batch: _Batch, params: SamplingParams, generator, use_cache: bool,
            progress: bool, score_temperature: float | None = None, align_prompts: bool | None = None,
            static_decode: bool = False) -> None:
    """score_temperature: not None → score every sampled token at it (return_logprobs)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    continuous = bool(batch.waiting)
    lens, limits = batch.lens[batch.active], (batch.ends - batch.lens)[batch.active]
    aligned = _aligning(stage, lens, limits, align_prompts)
    if continuous:
        total = continuous_cache_length(batch)
    else:  # right-aligned: every prompt ends at the longest prompt's last slot
        total = int(lens.max() + limits.max()) if aligned else int(batch.ends.max())
    context = StaticInferenceContext(batch.width, total) if use_cache else None
    static = StaticDecoder(stage, context) if static_decode else None
    if aligned and use_cache:
        slot = right_align_prompts(stage, batch, context)  # the cache slot whose token the next logits choose
        logits = _forward(stage, batch, slot - 1, slot, context)  # every row's last prompt token
    elif aligned:  # the same layout recomputed: same draws per step as the cached engine
        slot = int(lens.max())
        batch.start[batch.active] = slot - lens
        batch.moved()
        logits = _forward(stage, batch, 0, slot, None)
    else:
        slot = int(lens.min())
        logits = _forward(stage, batch, 0, slot, context)  # prefill of the shared prompt prefix
    bar = _progress_bar(None if continuous else total - slot, progress)
    while True:
        batch.row_steps += batch.n
        batch.slot_steps += batch.width
        if score_temperature is None:
            sampled = next_tokens(logits, params, generator) if stage.is_sampler else None
            batch.accept(stage.share(sampled, batch.n), slot)
        else:
            sampled, scores = (stage.sample_scored(logits, params, generator, score_temperature)
                               if stage.is_sampler else (None, None))
            sampled, scores = stage.share_scored(sampled, scores, batch.n)
            batch.accept(sampled, slot, scores)
        slot += 1
        bar.update(1)
        if batch.step_finished():
            break
        batch.compact(context, slot)
        if continuous:
            slot = shift_cache(batch, slot, context)
            admit_waiting(stage, batch, slot, context)
        if static is not None:
            logits = static.logits(batch, slot)
        elif use_cache:
            logits = _forward(stage, batch, slot - 1, slot, context)
        else:
            logits = _forward(stage, batch, 0, slot, None)
    bar.close()


def _check_static_decode(stage: StageRunner, use_cache: bool) -> None:
    if not use_cache:
        raise ValueError("static_decode needs the KV cache (use_cache=True)")
    if stage.pp_size > 1:
        raise ValueError("static_decode needs one pipeline stage (pipeline_model_parallel_size 1)")
    why = supports_static_step(stage.gpt)
    if why is not None:
        raise ValueError(f"static_decode {why}")


def _aligning(stage: StageRunner, lens: torch.Tensor, limits: torch.Tensor, requested: bool | None) -> bool:
    """Right-align ragged prompts (one prefill, then a padding mask at every decode step) rather
    than feed each longer prompt's extra tokens through batched single-token steps? Only where
    the attention honours a mask while decoding (TE's ignores it). By default (`requested`
    None) only when the spread is a large share of the response limit: aligned, every decode
    step attends over its row's padding too, with a mask. On a CPU, where a prefill token costs
    about what a decode row does, the saved steps only save per-step overhead — measured
    (docs/benchmarks.md, "Per phase, fifth round"): on par at the benchmark's quickstart shape (spread 16
    of 59), 1.13× at GSM8K lengths (~155 of 300). With EOS stops, responses end before the limit,
    so this rule errs towards feeding. `lens`, `limits`: the active rows' prompt lengths and
    response limits."""
    spread = int(lens.max() - lens.min())
    if spread == 0 or not stage.masks_while_decoding:
        return False
    if requested is not None:
        return requested
    return spread * ALIGN_WHEN_SPREAD_OVER >= int(limits.max())


def _forward(stage: StageRunner, batch: _Batch, begin: int, end: int, context):
    """Feed cache slots [begin, end) of the active rows (begin > 0 only with a cache holding the rest)."""
    rows = batch.active
    if batch.rows_at_own_slots():  # right-aligned prompts or continuous batching: each row at its own slot
        if context is None:
            return _recompute_own_slots(stage, batch, end)
        if begin > 0:
            return _forward_own_slots(stage, batch, end, context)
    tokens = batch.tokens[rows, begin:end]
    positions = torch.arange(begin, end, device=tokens.device).expand_as(tokens)
    # No mask tensor: the prefill (begin = 0, no padding before any real token — see the module
    # docstring) is plain causal attention, which the layer spec applies itself (SDPA: is_causal);
    # one new position sees the whole cache. Only single-token steps ever follow the prefill.
    mask = None
    if context is not None:
        context.sequence_len_offset = begin
        context.row_positions = None  # RoPE by cache slot (= every row's position here)
        if begin > 0:
            context.enable_decode_mode()
    return stage.last_logits(tokens, positions, mask, context, batch.choosing(end))


def _forward_own_slots(stage: StageRunner, batch: _Batch, end: int, context):
    """One decode step where rows started at different cache slots: each row feeds its own
    previous token at its own position and sees only its own cache slots (a mask hides what a
    row's cache held before its sequence was admitted). RoPE rotates by the cache slot, which
    shifts a row's query and keys alike: attention scores depend only on their difference."""
    rows = batch.active
    local = batch.local(end)
    # Finished rows awaiting a successor run on past their end: clamp, their outputs are unused.
    fed = (local - 1).clamp(max=batch.tokens.shape[1] - 1)
    tokens = batch.tokens[rows, fed].unsqueeze(1)
    positions = fed.unsqueeze(1)
    hidden = torch.arange(end, device=tokens.device) < batch.start[rows].unsqueeze(1)
    context.sequence_len_offset = end - 1
    context.row_positions = fed  # read by the llama SDPA spec's attention (models/sdpa_attention.py)
    context.enable_decode_mode()
    return stage.last_logits(tokens, positions, hidden[:, None, None, :], context, batch.choosing(end))


def move_cache_rows_to_front(context, rows: torch.Tensor, filled: int) -> None:
    """Copy KV-cache rows `rows` to rows 0..len(rows)-1, in place and only their slots
    [0, filled). megatron's `swap_key_value_dict` instead gathers every row and every slot of
    the cache into new tensors (3–9 % of a CPU rollout's time in profiles at the quickstart
    shape, 10 compactions; end to end the rollout got 2–3 % faster);
    here the rows left behind belong to finished sequences, never fed again, and slots past
    `filled` are written before they are read. In place also keeps the cache's batch-first
    storage (models/sdpa_attention.py)."""
    for memories in context.key_value_memory_dict.values():
        for memory in memories:  # [slots, rows, groups, dim] views
            memory[:filled, :len(rows)] = memory[:filled, rows]


def _recompute_own_slots(stage: StageRunner, batch: _Batch, end: int):
    """`use_cache=False` with rows at their own start slots: cache slots [0, end) recomputed, each
    row left-padded to its start, a mask keeping each query on its own row's earlier tokens (a
    padding query sees only itself: a row with nothing allowed would make NaNs)."""
    rows = batch.active
    slots = torch.arange(end, device=batch.tokens.device)
    local = slots - batch.start[rows].unsqueeze(1)  # [n, end]
    fed = local.clamp(min=0, max=batch.tokens.shape[1] - 1)
    tokens = batch.tokens[rows.unsqueeze(1), fed]
    causal = slots.unsqueeze(1) >= slots  # [query, key]
    allowed = (causal & (local >= 0).unsqueeze(1)) | torch.eye(end, dtype=torch.bool, device=slots.device)
    return stage.last_logits(tokens, fed, ~allowed.unsqueeze(1), None, batch.choosing(end))


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    return tqdm(total=total, disable=not (enabled and rank0), desc="generate", unit="step", leave=False)
