"""Build a megatron-core GPTModel (plus ReFT's value head) for this rank's pipeline stage.

The layer spec is chosen like megatron-core intends: Transformer Engine's when it imports,
the local (pure PyTorch) spec otherwise — model code is the same either way. In the local spec
`attention="sdpa"` (the default) takes torch's fused attention kernel without a mask tensor
(models/sdpa_attention.py), linears that skip megatron's autograd wrappers when no gradient
is recorded (models/inference_linear.py), a layer whose generation forward skips megatron's
training-time branches (models/inference_layer.py), and SwiGLU and RoPE as single autograd nodes
(models/fused_elementwise.py); `"megatron"` keeps megatron's own modules
(`baddbmm` + masked softmax).
"""
from __future__ import annotations

import hashlib
import math

import torch

from megatron_reft.models import sharding
from megatron_reft.models.families import ModelConfig, transformer_config


def te_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # any import failure means "not usable here"
        return False
    return True


ATTENTION_BACKENDS = ("sdpa", "megatron")


def layer_spec(model: ModelConfig, use_te: bool | None = None, attention: str = "sdpa"):
    from megatron.core.models.gpt import gpt_layer_specs

    use_te = te_available() if use_te is None else use_te
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {attention!r} is not one of {ATTENTION_BACKENDS}")
    norm = "RMSNorm" if model.family == "llama" else "LayerNorm"
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization=norm)
    if attention == "sdpa":  # swap submodules only (ModuleSpec, model unchanged)
        from megatron_reft.models.inference_linear import InferenceColumnParallelLinear, InferenceRowParallelLinear
        from megatron_reft.models.sdpa_attention import SDPADotProductAttention

        attention_parts, mlp_parts = spec.submodules.self_attention.submodules, spec.submodules.mlp.submodules
        attention_parts.core_attention = SDPADotProductAttention
        # Linears without autograd wrappers when no gradient is recorded (decode, log-prob passes)
        attention_parts.linear_qkv = mlp_parts.linear_fc1 = InferenceColumnParallelLinear
        attention_parts.linear_proj = mlp_parts.linear_fc2 = InferenceRowParallelLinear
        # ... and a layer forward without megatron's training-time branches for generation
        from megatron_reft.models.inference_layer import InferenceTransformerLayer

        spec.module = InferenceTransformerLayer
        from megatron_reft.models.sdpa_attention import rope_cached_self_attention, static_slot_self_attention

        # RoPE: rotate each key once, as it enters the KV cache. Both: the static-shape decode
        # step's cache write (generation/static_step.py)
        spec.submodules.self_attention.module = (rope_cached_self_attention() if model.family == "llama"
                                                 else static_slot_self_attention())
    return spec


def _gpt_model_class():
    from megatron.core.models.gpt import GPTModel

    class ReftGPTModel(GPTModel):
        """GPTModel that can hand back its final (post-norm) hidden states and owns a value head.

        ReFT's critic is a linear hidden→1 head on the policy's last hidden state (reft.md §4,
        "shared trunk"); it lives on the last pipeline stage next to the output layer. The
        engine computes logits from the hidden states in chunks, so full-vocabulary fp32
        logits for the whole batch never exist at once.
        """

        def __init__(self, *args, with_value_head: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.value_head = None
            if with_value_head and self.post_process:
                self.value_head = torch.nn.Linear(self.config.hidden_size, 1,
                                                  dtype=self.config.params_dtype)
            self._return_hidden = False

        def forward(self, *args, return_hidden: bool = False, **kwargs):
            self._return_hidden = return_hidden
            try:
                return super().forward(*args, **kwargs)
            finally:
                self._return_hidden = False

        def _postprocess(self, hidden_states, *args, **kwargs):
            if self._return_hidden:
                return hidden_states  # [s, b, h], after the final norm
            return super()._postprocess(hidden_states, *args, **kwargs)

        def output_weight(self):
            return self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None

    return ReftGPTModel


def build_model(model: ModelConfig, *, dtype: torch.dtype = torch.float32, use_te: bool | None = None,
                with_value_head: bool = False, recompute: bool = False, attention: str = "sdpa"):
    """The model chunk for this rank (TP/PP from megatron's parallel state)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    config = transformer_config(model, tensor_parallel=tp, pipeline_parallel=pp, dtype=dtype,
                                on_gpu=torch.cuda.is_available(), recompute=recompute)
    cls = _gpt_model_class()
    gpt = cls(
        config=config,
        transformer_layer_spec=layer_spec(model, use_te, attention),
        vocab_size=model.padded_vocab_size(tp),
        max_sequence_length=model.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_embeddings,
        position_embedding_type="rope" if model.family == "llama" else "learned_absolute",
        rotary_base=model.rope_theta,
        **_rope_scaling_args(model),
        with_value_head=with_value_head,
    )
    _apply_llama3_rope_scaling(gpt, model)
    _mark_tensor_parallel(gpt)
    if attention == "sdpa" and not (te_available() if use_te is None else use_te):
        _fuse_swiglu(gpt)
        _fuse_rms_norms(gpt)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def _fuse_swiglu(gpt) -> None:
    """The local spec's MLPs with SwiGLU as one autograd node (models/fused_elementwise.py). The
    class is changed after megatron built each MLP, not in the spec: `TransformerLayer` passes
    its TP group only to a spec whose module is `MLP` itself (any other class is built with
    default arguments and a warning). `SwiGLUMLP` only overrides `forward`, and runs megatron's
    wherever its config is not the plain gated-SiLU case (OPT's GELU MLP included)."""
    from megatron.core.transformer.mlp import MLP

    from megatron_reft.models.fused_elementwise import swiglu_mlp

    fused = swiglu_mlp()
    for layer in gpt.decoder.layers:
        if type(layer.mlp) is MLP:
            layer.mlp.__class__ = fused


def _fuse_rms_norms(gpt) -> None:
    """The local spec's `torch.nn.RMSNorm`s (each layer's two, the final one) as `FusedRMSNorm`:
    the closed-form backward on CPU fp32 training passes (models/fused_elementwise.py). Only the
    class changes, so parameters, names and checkpoints stay torch's."""
    from megatron_reft.models.fused_elementwise import FusedRMSNorm

    for module in gpt.modules():
        if type(module) is torch.nn.RMSNorm:
            module.__class__ = FusedRMSNorm


def _rope_scaling_args(model: ModelConfig) -> dict:
    if model.family != "llama" or model.rope_scaling is None:
        return {}
    return {"rope_scaling": True, "rope_scaling_factor": float(model.rope_scaling["factor"])}


def _apply_llama3_rope_scaling(gpt, model: ModelConfig) -> None:
    """megatron-core applies Llama-3's scaling with its own fixed low/high frequency factors and
    original context (1, 4, 8192); recompute the inverse frequencies with the checkpoint's values
    through the same megatron function so every Llama-3.x variant is exact. Every consumer of
    positions (training forward, the rollout engine's KV-cache decode) reads this one table."""
    if model.family != "llama" or model.rope_scaling is None:
        return
    rotary = gpt.rotary_pos_emb
    dim = rotary.inv_freq.numel() * 2
    base = 1.0 / (model.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                      device=rotary.inv_freq.device) / dim))
    s = model.rope_scaling
    rotary.inv_freq = rotary._apply_scaling(
        base, factor=float(s["factor"]), low_freq_factor=float(s["low_freq_factor"]),
        high_freq_factor=float(s["high_freq_factor"]),
        original_max_position_embeddings=int(s["original_max_position_embeddings"]))


def _mark_tensor_parallel(gpt) -> None:
    """Tag TP-sharded parameters (megatron only tags them when it initialises them itself,
    and we skip its init). Grad-norm clipping and the distributed optimizer rely on the tags to
    count replicated parameters once."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    for name, param in global_param_names(gpt).items():
        k = sharding.kind(name)
        if k != "replicated" and not getattr(param, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(param, True, 1 if k == "row" else 0, 1)


def layer_offset(gpt) -> int:
    """Global index of this stage's first transformer layer."""
    layers = gpt.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


def global_param_names(gpt) -> dict[str, torch.nn.Parameter]:
    """This stage's parameters under global names (layer numbers counted over all stages).

    With tied embeddings under PP, the last stage's copy of the embedding is named like the
    first stage's one so that it is drawn from the same generator.
    """
    offset = layer_offset(gpt)
    names = {}
    for local_name, param in gpt.named_parameters():
        name = sharding.global_layer_name(local_name, offset)
        if name == "output_layer.weight" and gpt.share_embeddings_and_output_weights:
            name = "embedding.word_embeddings.weight"
        names[name] = param
    return names


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def full_shape(name: str, local: torch.Size, model: ModelConfig, tp: int) -> tuple[int, ...]:
    k = sharding.kind(name)
    if k == "vocab":
        return (model.vocab_size,) + tuple(local[1:])
    if k in ("column", "gated_column"):
        return (local[0] * tp,) + tuple(local[1:])
    if k == "row":
        return (local[0], local[1] * tp)
    return tuple(local)


def _draw_full(name: str, shape, model: ModelConfig, seed: int) -> torch.Tensor:
    if name.endswith("bias") or "layer_norm_bias" in name:
        return torch.zeros(shape)
    if "norm" in name:  # RMSNorm / LayerNorm weights (local and TE names)
        return torch.ones(shape)
    std = model.init_std
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * model.num_layers)  # megatron's scaled output-layer init
    return torch.randn(shape, generator=_generator(seed, name)) * std


@torch.no_grad()
def init_weights(gpt, model: ModelConfig, seed: int) -> None:
    """Same full weights for the same seed under any TP × PP layout.

    Each parameter's full tensor is drawn from a generator keyed by (seed, global name) and
    this rank keeps its TP shard. Costs a full-tensor draw per rank: fine for fresh small models;
    large models start from converted checkpoints instead.
    """
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, param in global_param_names(gpt).items():
        if name.startswith("value_head."):
            continue  # reset_value_head() draws it
        full = _draw_full(name, full_shape(name, param.shape, model, tp), model, seed)
        local = sharding.shard(name, full, tp_rank, tp, gated=model.gated,
                               padded_vocab=model.padded_vocab_size(tp))
        param.copy_(local.to(param.dtype))


@torch.no_grad()
def reset_value_head(gpt, seed: int) -> None:
    """Fresh random value head (reft.md §4: randomly initialised, no value warm-up)."""
    head = getattr(gpt, "value_head", None)
    if head is None:
        return
    gen = _generator(seed, "value_head.weight")
    head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / math.sqrt(head.in_features))
    head.bias.zero_()
