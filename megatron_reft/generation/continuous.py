"""Continuous batching for the rollout engine on megatron-core 0.16.1's static KV cache.

megatron's `StaticInferenceContext` has one write offset per batch (`sequence_len_offset`) and
writes a contiguous range of rows, so a prompt cannot be prefilled into one row of a running
batch directly. Three facts make admission possible anyway:

- the cache stores keys *before* RoPE (the static path rotates the whole cached key by its cache
  slot at every step), and a token's K/V depend on its position only relative to the tokens
  before it — so a prompt prefilled on its own, from slot 0 of a small scratch context, yields
  exactly the K/V it would have anywhere; we copy them into the freed row, right-aligned so that
  the prompt's last token is the one the next batched decode step feeds;
- during decoding each row feeds its own previous token at its own position, and a padding mask
  hides the cache slots before its start (what the row's previous occupant left there);
- when the write slot reaches the end of the cache, every row's slots move left by the oldest
  running row's start (one copy per layer every ~max-sequence steps): RoPE scores depend on the
  query-key distance only, learned positions are fed per row — so the cache needs twice the
  longest sequence, not the whole schedule.

Finished rows are refilled in groups (`ADMIT_GROUP`, a fraction of the slots) so that a prefill
call serves several prompts; until then they run on as idle rows (counted in decode_row_steps).
"""
from __future__ import annotations

import torch

ADMIT_GROUP = 1 / 8  # refill once this fraction of the slots (or the whole queue) is free
# Shift as soon as the oldest running row started this many slots in: every decode step attends
# to (and megatron re-rotates) the cache up to the write slot, so a short prefix is cheaper.
SHIFT_AT = 16
# Prompt positions per prefill call (right-aligned prompts, admissions): length-sorted groups
# trimmed to their longest; large enough that a GPU prefill stays compute-bound.
PREFILL_TOKENS = 4096


def continuous_cache_length(batch) -> int:
    """Cache slots: twice the longest prompt + response, so a shift frees ≥ one sequence's span."""
    return 2 * int(batch.ends.max())


def admit_waiting(stage, batch, slot: int, context) -> None:
    """Admit waiting prompts (in order) into finished rows; the next decode step feeds each its
    last prompt token at cache slot `slot - 1`."""
    if not batch.waiting:
        return
    done = batch.done[batch.active].tolist()
    free = [r for r, d in enumerate(done) if d] + list(range(batch.n, batch.width))
    if len(free) < min(len(batch.waiting), max(1, round(ADMIT_GROUP * batch.width))):
        return
    take = []
    for seq in batch.waiting:  # a prompt needs `len` cache slots before `slot`; keep queue order
        if len(take) == len(free) or int(batch.lens[seq]) > slot:
            break
        take.append(seq)
    if not take:
        return
    rows = free[:len(take)]
    _prefill_rows(stage, batch, take, rows, slot, context)
    batch.waiting = batch.waiting[len(take):]
    take_t = torch.tensor(take, device=batch.rows.device)
    batch.rows[torch.tensor(rows, device=batch.rows.device)] = take_t
    batch.start[take_t] = slot - batch.lens[take_t]
    batch.n = max(batch.n, max(rows) + 1)
    batch.moved()


def _prefill_rows(stage, batch, seqs: list[int], rows: list[int], slot: int, context) -> None:
    """All but the last prompt token of `seqs`, prefilled from slot 0 of scratch contexts, copied
    into cache rows `rows` so that each prompt ends at cache slot `slot - 1`. The prompts go in
    length-sorted groups of ≤ PREFILL_TOKENS positions, each right-padded to its own longest
    (causal attention never lets a real token see the padding): one padded block of every
    prompt would compute about twice the tokens on real GSM8K lengths, and bounds no memory."""
    from megatron_reft.data.batching import plan_micro_batches

    counts = [int(batch.lens[s]) - 1 for s in seqs]  # tokens prefilled per prompt
    for group in plan_micro_batches(counts, len(seqs), token_budget=PREFILL_TOKENS):
        if counts[group[0]] > 0:  # longest first; one-token prompts: the decode step feeds them
            _prefill_group(stage, batch, [seqs[i] for i in group], [rows[i] for i in group], slot, context)


def _prefill_group(stage, batch, seqs: list[int], rows: list[int], slot: int, context) -> None:
    from megatron.core.inference.contexts import StaticInferenceContext

    device = batch.tokens.device
    lens = batch.lens[torch.tensor(seqs, device=device)]
    width = int(lens.max()) - 1
    tokens = batch.tokens[torch.tensor(seqs, device=device), :width]
    positions = torch.arange(width, device=device).expand_as(tokens)
    scratch = StaticInferenceContext(len(seqs), width)
    no_choice = torch.zeros(len(seqs), dtype=torch.bool, device=device)  # no logits needed: skip the output layer
    stage.last_logits(tokens, positions, None, scratch, no_choice)
    # One indexed copy per layer: (scratch slot j, scratch row i) -> (slot - len_i + j, rows[i])
    # for j < len_i - 1 (a loop over rows would be rows × layers tiny copies, kernel launches on a GPU).
    counts = lens - 1
    source_row = torch.repeat_interleave(torch.arange(len(seqs), device=device), counts)
    firsts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    source_slot = torch.arange(int(counts.sum()), device=device) - firsts
    target_row = torch.tensor(rows, device=device)[source_row]
    target_slot = slot - lens[source_row] + source_slot
    for layer, (keys, values) in scratch.key_value_memory_dict.items():
        if layer not in context.key_value_memory_dict:  # prompts entering a fresh cache
            context.key_value_memory_dict[layer] = (_zeroed_cache(context, keys), _zeroed_cache(context, values))
        cache_keys, cache_values = context.key_value_memory_dict[layer]
        cache_keys[target_slot, target_row] = keys[source_slot, source_row]
        cache_values[target_slot, target_row] = values[source_slot, source_row]


def _zeroed_cache(context, like: torch.Tensor) -> torch.Tensor:
    """One layer's K or V cache for `context`, as megatron would allocate it on its first
    forward ([slots, rows, groups, dim], here stored batch-first like models/sdpa_attention.py's)
    but zeroed: the slots a row's mask hides must hold finite numbers (a masked NaN still
    poisons the attention's weighted sum, 0 × NaN)."""
    _, _, groups, dim = like.shape
    stored = torch.zeros(context.max_batch_size, groups, context.max_sequence_length, dim,
                         dtype=like.dtype, device=like.device)
    return stored.permute(2, 0, 1, 3)


def right_align_prompts(stage, batch, context) -> int:
    """Start decoding with every active row's prompt ending at the same cache slot: prefill all
    but their last tokens at once (`_prefill_rows`), each row starting at its own cache slot,
    instead of feeding the longer prompts one token per batched decode step. Returns the cache
    slot whose token the first decode step's logits choose."""
    seqs = batch.rows[:batch.n]
    slot = int(batch.lens[seqs].max())
    _prefill_rows(stage, batch, seqs.tolist(), list(range(batch.n)), slot, context)
    batch.start[seqs] = slot - batch.lens[seqs]
    batch.moved()
    return slot


def shift_cache(batch, slot: int, context) -> int:
    """If the next write (cache slot `slot - 1`) would fall off the cache, move every row's slots
    left by the oldest running row's start; returns the new `slot`."""
    size = context.max_sequence_length
    active = batch.active
    running = active[~batch.done[active]]
    # Nothing running (all rows await successors): keep room for the longest prompt.
    shift = int(batch.start[running].min()) if len(running) else slot - size // 2
    if slot <= size and shift < SHIFT_AT:
        return slot
    assert shift > 0, "cache shorter than a sequence"  # continuous_cache_length prevents this
    for layer, (keys, values) in context.key_value_memory_dict.items():
        keys[:size - shift] = keys[shift:].clone()
        values[:size - shift] = values[shift:].clone()
    batch.start[batch.rows] -= shift
    batch.moved()
    return slot - shift
