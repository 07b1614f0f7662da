"""Rollout engine: batched KV-cached sampling on the megatron-core model (docs/architecture.md).

    from megatron_reft.generation import generate, SamplingParams, GenerationOutput
    out = generate(engine, prompts, eos_id, SamplingParams(max_new_tokens=400), seed=step)
"""
from megatron_reft.generation.generate import GenerationOutput, generate, response_limits
from megatron_reft.generation.sampling import SamplingParams, next_tokens

__all__ = ["generate", "SamplingParams", "GenerationOutput", "next_tokens", "response_limits"]
