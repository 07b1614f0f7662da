"""Next-token choice from fp32 logits: greedy, temperature, top-k, top-p (nucleus).

Pure tensor functions: no distributed code here. The rollout loop calls `next_tokens` on ONE
rank (the sampler) and broadcasts the result, so every rank of the model-parallel group agrees
on the tokens by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_reft.models.vocab_parallel import full_vocab_logprobs_and_entropy


@dataclass
class SamplingParams:
    """How to decode. reft.md §4-5 rollouts: temperature 1, no top-k/top-p, prompt+response ≤ 700.

    - `greedy=True` (or `temperature=0`) takes the argmax: evaluation uses this.
    - `top_k=0` and `top_p=1.0` mean "off".
    - A sequence stops at EOS (EOS is kept in its tokens) when `stop_at_eos` and not `ignore_eos`;
      `ignore_eos=True` generates to the length limit whatever is sampled (fixed-length
      benchmarks: two engines then do the same work).
    - Length: at most `max_new_tokens` response tokens and prompt + response ≤
      `max_total_length`. `max_prompt_length` (None: no check) rejects longer prompts.
    """

    max_new_tokens: int = 400
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    greedy: bool = False
    max_total_length: int = 700
    stop_at_eos: bool = True
    ignore_eos: bool = False
    max_prompt_length: Optional[int] = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_total_length < 2:
            raise ValueError(f"max_total_length must be >= 2, got {self.max_total_length}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @property
    def stops_at_eos(self) -> bool:
        return self.stop_at_eos and not self.ignore_eos


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are all kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always ≥ 1)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already hold ≥ p of the mass;
    # the top token has nothing above it, so it always stays.
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


# Drawn for a row whose logits are not finite (a diverged model): never a real token, so the
# engine raises on every rank after the broadcast instead of decoding from garbage.
NO_TOKEN = -1


def next_tokens(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [b, V] (fp32, true vocabulary only) → token ids [b] (int64); NO_TOKEN for a row
    with a NaN or infinite logit."""
    if params.is_greedy:  # argmax would pick a NaN's index
        return logits.argmax(dim=-1).masked_fill(~torch.isfinite(logits).all(dim=-1), NO_TOKEN)
    return sample_from(_sampling_probs(logits, params), generator)


def _sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return logits.softmax(dim=-1)


# Inverse transform sampling looks a uniform up in the cumulative distribution. Over a 32k
# vocabulary a float64 copy and cumulative sum of every row cost a CPU decode step more than
# the rest of the sampler; two levels — sums of blocks of BLOCK entries, then the cumulative sum
# of the one block the uniform falls into — read the probabilities once and cumulate only
# ~V/BLOCK + BLOCK values per row.
BLOCK = 256


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from non-negative weights [b, V] (they need not sum to 1), by inverse
    transform sampling: one float64 uniform per row, and the first token whose cumulative weight
    exceeds it. (torch.multinomial draws an exponential per vocabulary entry: ~15x slower on a
    CPU for a 32k vocabulary.) A token of zero weight is never drawn; a row whose total weight
    is not a positive finite number draws NO_TOKEN. The draw for a given uniform is the flat
    float64 cumulative sum's, except where fp32 block sums move a token boundary by rounding
    (~1e-7 of a block's mass)."""
    rows, vocab = probs.shape
    u = torch.rand((rows, 1), generator=generator, dtype=torch.float64, device=probs.device)
    if vocab <= 8 * BLOCK:  # small vocabulary: one level is cheaper
        cdf = probs.double().cumsum(dim=-1)
        broken = _unusable(cdf)
        return _first_above(cdf, u * cdf[:, -1:]).masked_fill(broken, NO_TOKEN)
    # Block sums in fp32 (a float64-accumulating reduction is ~20x slower on a CPU); the tail
    # past the last whole block is one more, shorter block.
    whole = vocab // BLOCK * BLOCK
    block_mass = probs[:, :whole].reshape(rows, -1, BLOCK).sum(dim=-1)
    if whole < vocab:
        block_mass = torch.cat([block_mass, probs[:, whole:].sum(dim=-1, keepdim=True)], dim=1)
    block_cdf = block_mass.double().cumsum(dim=-1)
    broken = _unusable(block_cdf)  # any cdf will do for those rows (their draw is replaced)
    placeholder = torch.arange(1, block_cdf.shape[1] + 1, dtype=block_cdf.dtype, device=block_cdf.device)
    block_cdf = torch.where(broken[:, None], placeholder, block_cdf)
    u = u * block_cdf[:, -1:]
    block = _first_above(block_cdf, u)  # [b]; its mass is > 0: the cdf steps over u there
    mass_before = F.pad(block_cdf, (1, 0))[:, :-1].gather(1, block[:, None])  # ≤ u, so u − it ≥ 0
    index = block[:, None] * BLOCK + torch.arange(BLOCK, device=probs.device)
    inner = probs.gather(1, index.clamp(max=vocab - 1)) * (index < vocab)
    # u − mass_before is below the block's mass up to rounding; `_first_above` keeps it below
    # the block's own cumulative total.
    tokens = block * BLOCK + _first_above(inner.double().cumsum(dim=-1), u - mass_before)
    return tokens.masked_fill(broken, NO_TOKEN)


def _unusable(cdf: torch.Tensor) -> torch.Tensor:
    """Rows [b] whose total weight is NaN, infinite or not positive."""
    total = cdf[:, -1]
    return ~(torch.isfinite(total) & (total > 0))


def _first_above(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index of the first entry of each row of `cdf` (non-decreasing, float64) that exceeds u
    [b, 1]; u is kept strictly below the row's total, so the index always lands on an entry of
    non-zero weight."""
    total = cdf[:, -1:]
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """logits [b, V] (fp32, true vocabulary), tokens [b] → (log p(token), entropy) [b] of the FULL
    distribution softmax(logits / temperature), before any top-k/top-p filtering: the quantities
    the training forward computes, by the same code (models/vocab_parallel.py)."""
    scaled = logits / temperature if temperature != 1.0 else logits.clone()  # the sampler still needs logits
    return full_vocab_logprobs_and_entropy(scaled, tokens)


def sample_and_score(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                     score_temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`next_tokens` plus `token_logprobs_and_entropy` of the drawn tokens at `score_temperature`
    (the rollout's old log-probs, ppo.old_logprobs_from_rollout). The same draws as `next_tokens`.

    When the sampler draws from the very distribution that is scored (reft.md §4 rollouts:
    temperature 1, no top-k/top-p) one softmax serves both: with p = softmax(z), z = logits/T
    shifted by its max, the top token's p is e^0/Σe^z, so log Σe^z = −log max p, and
    log p(token) = z_token − log Σe^z, H = log Σe^z − Σ p·z: no second full-vocabulary exp
    (the slowest part of scoring on a CPU)."""
    shares = (not params.is_greedy and params.temperature == score_temperature
              and params.top_k == 0 and params.top_p >= 1.0)
    if not shares:
        tokens = next_tokens(logits, params, generator)
        return (tokens, *token_logprobs_and_entropy(logits, tokens.clamp(min=0), score_temperature))
    scaled = logits / score_temperature
    probs = scaled.softmax(dim=-1)  # = _sampling_probs(logits, params) here: the same draws
    tokens = sample_from(probs, generator)
    shifted = scaled.sub_(scaled.amax(dim=-1, keepdim=True))
    # p = e^z / S' with S' the softmax kernel's own sum; Σp (summed again, pairwise) = S / S'
    # with S the accurate sum: log S = log Σp − log max p, good to ~1e-7 over a 32k vocabulary
    # where −log max p alone is off by the kernel's summation error (~3e-6).
    mass = probs.sum(dim=-1)
    log_sum_exp = mass.log() - probs.amax(dim=-1).log()
    logprobs = shifted.gather(1, tokens.clamp(min=0)[:, None]).squeeze(1) - log_sum_exp  # NO_TOKEN: any
    entropy = log_sum_exp - torch.linalg.vecdot(probs, shifted) / mass
    return tokens, logprobs, entropy
