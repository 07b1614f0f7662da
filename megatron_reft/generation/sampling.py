"""Next-token choice from fp32 logits: greedy, temperature, top-k, top-p (nucleus).

Pure tensor functions: no distributed code here. The rollout loop calls `next_tokens` on ONE
rank (the sampler) and broadcasts the result, so every rank of the model-parallel group agrees
on the tokens by construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

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


def next_tokens(logits: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [b, V] (fp32, true vocabulary only) → token ids [b] (int64)."""
    if params.is_greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return sample_from(logits.softmax(dim=-1), generator)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row by inverse transform sampling: one float64 uniform against the
    cumulative probabilities. (torch.multinomial draws an exponential per vocabulary entry:
    ~15x slower on a CPU for a 32k vocabulary, and it dominated a whole decode step.)"""
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device) * total
    # Strictly below the total, so the search lands on a token with non-zero probability.
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def token_logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0):
    """logits [b, V] (fp32, true vocabulary), tokens [b] → (log p(token), entropy) [b] of the FULL
    distribution softmax(logits / temperature), before any top-k/top-p filtering: the quantities
    the training forward computes, by the same code (models/vocab_parallel.py)."""
    scaled = logits / temperature if temperature != 1.0 else logits.clone()  # the sampler still needs logits
    return full_vocab_logprobs_and_entropy(scaled, tokens)
