"""The one seam between algorithms and parallelism (DESIGN.md "One engine seam").

`Engine` wraps this rank's megatron-core model chunk and offers
- `forward_backward(microbatches, loss_fn)` / `train_step(...)`: megatron-core pipeline schedules,
  DDP gradient reduction, optimizer step with clipping;
- `forward(microbatches)`: per-token log-probs, entropy and values (no grad), returned on
  every rank of the pipeline.
SFT and PPO code never sees TP/PP: it builds micro-batches of tokens and writes a loss.
Micro-batches may differ in shape (length-sorted, trimmed; rl/rollout.py): without PP one
schedule call runs them all, with PP one call per shape and one gradient normalisation at the
end. Log-probs are computed only where the micro-batch's `action_mask`/`loss_mask` is set.

Loss convention (megatron's `calculate_per_token_loss`): a loss function returns
`(loss_sum, normaliser_count, stats)`; megatron sums `loss_sum` over micro-batches and DP ranks
and divides gradients by the summed count. With token counts this is the global per-token mean
(SFT); with sequence counts and per-sequence means it is reft.md §4's "per sequence, then over
sequences" average over the whole mini-batch, exactly, whatever the micro-batching.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from megatron_reft.checkpoint.io import unwrap
from megatron_reft.models.build import build_model, init_weights, reset_value_head
from megatron_reft.models.families import ModelConfig
from megatron_reft.models.vocab_parallel import token_logprobs_and_entropy
from megatron_reft.reliability.numerics import step_is_finite

LossFn = Callable[[dict, dict], tuple]


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class OptimSettings:
    lr: float
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False


def causal_mask(seq: int, device=None) -> torch.Tensor:
    """[1, 1, s, s] boolean, True where attention is NOT allowed (megatron's convention)."""
    return torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), diagonal=1)[None, None]


def _pad_to(t: torch.Tensor, length: int, value=0) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    pad = t.new_full((t.shape[0], length - t.shape[1]) + tuple(t.shape[2:]), value)
    return torch.cat([t, pad], dim=1)


def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """values at the True positions of `where` [s, b], zeros elsewhere, as [b, s]."""
    out = values.new_zeros(where.shape)
    out = out.index_put((where,), values) if values.requires_grad else out.index_put_((where,), values)
    return out.t()


def _deferred_finalize(finalize, counts: list, last: bool):
    """finalize_model_grads for one of several schedule calls of a step: earlier calls only
    record their loss counts (gradients keep accumulating in the DDP buffers, reduced nowhere
    yet); the last call reduces them once, normalised by the count summed over all calls."""
    def run(model, num_tokens, *args, **kwargs):
        if num_tokens is None:  # not per-token normalisation: nothing to add up
            return finalize(model, num_tokens, *args, **kwargs) if last else None
        if not last:
            counts.append(num_tokens.clone())
            return None
        return finalize(model, num_tokens + sum(counts), *args, **kwargs)

    return run


class Engine:
    def __init__(self, model: ModelConfig, *, dtype: torch.dtype = torch.float32, use_te=None,
                 with_value_head: bool = False, optim: OptimSettings | None = None,
                 recompute: bool = False, logprob_chunk_tokens: int = 4096, attention: str = "sdpa",
                 value_only: bool = False):
        """value_only: a separate critic (issue 12): forward and backward stop at the value head
        (no logits, log-probs or entropy), and an untied output layer is frozen (no gradient
        buffer, no optimizer state). The layer itself stays: megatron's GPTModel builds it on
        the last stage, its sharded state dict names it, and keeping it lets the critic load the
        warm-up checkpoint and export as an ordinary model (docs/architecture.md)."""
        from megatron.core import parallel_state as ps

        self.model_config = model
        self.dtype = dtype
        self.chunk_tokens = logprob_chunk_tokens
        self.temperature = 1.0
        self._with_entropy = True
        self.score_masked_only = True  # False: log-probs at every position (today's behaviour; tests)
        self.gpt = build_model(model, dtype=dtype, use_te=use_te, with_value_head=with_value_head,
                               recompute=recompute, attention=attention)
        self.value_only = value_only and with_value_head
        if self.value_only:
            _freeze_unused_output_layer(self.gpt)
        self.tconfig = self.gpt.config
        self.tconfig.calculate_per_token_loss = True
        self.is_first_stage = ps.is_pipeline_first_stage()
        self.is_last_stage = ps.is_pipeline_last_stage()
        self.module = self.gpt
        if dtype in (torch.bfloat16, torch.float16):
            from megatron.core.transformer.module import Float16Module

            self.module = Float16Module(self.tconfig, self.gpt)
        self.optimizer = None
        if optim is not None:
            self._setup_training(optim)

    # ---------------------------------------------------------------- set-up
    def _setup_training(self, optim: OptimSettings) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=optim.use_distributed_optimizer)
        self.module = DistributedDataParallel(self.tconfig, ddp_config, self.module)
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = self.module.no_sync
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer="adam", lr=optim.lr, weight_decay=optim.weight_decay,
                            adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2,
                            adam_eps=optim.adam_eps, clip_grad=optim.clip_grad,
                            bf16=self.dtype == torch.bfloat16, fp16=self.dtype == torch.float16,
                            params_dtype=self.dtype,
                            use_distributed_optimizer=optim.use_distributed_optimizer),
            [self.module])
        fuse_cpu_adam(self.optimizer)

    def init_from_scratch(self, seed: int) -> None:
        init_weights(self.gpt, self.model_config, seed)
        reset_value_head(self.gpt, seed)
        self._sync_param_copies()

    def reset_value_head(self, seed: int) -> None:
        reset_value_head(self.gpt, seed)
        self._sync_param_copies()

    def offload(self) -> None:
        """Move weights to host memory between uses (the frozen reference model, on GPU)."""
        if torch.cuda.is_available():
            self.gpt.cpu()

    def onload(self) -> None:
        if torch.cuda.is_available():
            self.gpt.cuda(torch.cuda.current_device())

    def _sync_param_copies(self) -> None:
        """After writing model params in place, refresh the optimizer's fp32 main copies."""
        if self.optimizer is not None and hasattr(self.optimizer, "reload_model_params"):
            self.optimizer.reload_model_params()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # ---------------------------------------------------------------- core
    def _forward_step(self, loss_fn: LossFn | None):
        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            tokens = mb["tokens"] if self.is_first_stage else None
            hidden = model(tokens, mb["position_ids"], mb["attention_mask"], return_hidden=True)
            if not self.is_last_stage:
                return hidden, None
            return hidden, lambda h: self._last_stage_loss(mb, h, loss_fn)

        return forward_step

    def _last_stage_loss(self, mb: dict, hidden: torch.Tensor, loss_fn: LossFn | None):
        gpt = self.gpt
        hidden = hidden.to(self.dtype)
        # Entropy is a rollout statistic, not a training input: only forward passes that log it
        # pay for its full-vocabulary reduction.
        with_entropy = loss_fn is None and self._with_entropy
        logprobs = entropy = None
        if not self.value_only:  # a separate critic never reads the LM head's outputs
            logprobs, entropy = self._scored_logprobs(mb, hidden, with_entropy)
        values = None
        if gpt.value_head is not None:
            values = gpt.value_head(hidden).squeeze(-1).t().float()  # [b, s]
        out = {"logprobs": logprobs, "entropy": entropy, "values": values}
        if loss_fn is None:  # forward only: hand the per-token outputs back
            detached = {k: v.detach() for k, v in out.items() if v is not None}
            return torch.zeros(()), torch.ones((), dtype=torch.int), detached
        loss_sum, count, stats = loss_fn(mb, out)
        return loss_sum, torch.as_tensor(count, dtype=torch.int).reshape(()), stats

    def _scored_logprobs(self, mb: dict, hidden: torch.Tensor, with_entropy: bool):
        """Log-probs (and entropy) [b, s] at the positions the micro-batch scores — its
        `action_mask` (PPO) or `loss_mask` (SFT) — and 0 elsewhere: no loss, statistic or
        advantage reads other positions, so the output layer and the fp32 vocabulary softmax
        skip the prompt and the padding (only needed work). Without a mask: every position."""
        gpt = self.gpt
        mask = mb.get("action_mask", mb.get("loss_mask"))
        args = (gpt.output_layer, gpt.output_weight(), self.model_config.vocab_size, self.chunk_tokens,
                self.temperature)
        if (mask is None or not self.score_masked_only or self.tconfig.sequence_parallel
                or not bool(mask.any())):
            return token_logprobs_and_entropy(hidden, mb["labels"], *args, with_entropy=with_entropy)
        scored = mask.t() != 0  # [s, b], the layout of hidden
        lp, ent = token_logprobs_and_entropy(hidden[scored].unsqueeze(1), mb["labels"].t()[scored].unsqueeze(0),
                                             *args, with_entropy=with_entropy)
        return _scatter(lp[0], scored), (_scatter(ent[0], scored) if with_entropy else None)

    def _prepare(self, microbatches: list[dict]) -> tuple[list[dict], int, int]:
        """With PP, pad the micro-batches of one schedule call to one [b, s] (pipeline P2P needs
        fixed shapes; without PP they keep their own); add positions. No attention-mask tensor: every layer spec applies its causal
        mask itself (megatron's attn_mask_type), SDPA without materialising one."""
        from megatron.core import parallel_state as ps

        uniform = ps.get_pipeline_model_parallel_world_size() > 1  # else any shapes may mix
        seq = max(mb["tokens"].shape[1] for mb in microbatches)
        batch = microbatches[0]["tokens"].shape[0]
        # Batches are built on the host (data loaders, rollout batches); the model's device may
        # be a GPU: the one place every job's inputs pass through copies them there.
        device = next(self.gpt.parameters()).device
        prepared = []
        for mb in microbatches:
            if uniform and mb["tokens"].shape[0] != batch:
                raise ValueError("all micro-batches of one call must have the same batch size")
            mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
            if uniform:
                mb = {k: (_pad_to(v, seq) if torch.is_tensor(v) and v.dim() >= 2 and k != "attention_mask" else v)
                      for k, v in mb.items()}
            mb.setdefault("attention_mask", None)
            if "position_ids" not in mb:
                b, s = mb["tokens"].shape
                mb["position_ids"] = torch.arange(s, device=mb["tokens"].device).expand(b, s)
            prepared.append(mb)
        return prepared, seq, batch

    def _shape_groups(self, microbatches: list[dict]) -> list[list[int]]:
        """Micro-batch indices per pipeline schedule call. Without pipelining the schedule takes
        any shapes, so one call; with PP every call needs one [b, s], so one call per shape
        (callers keep the number of shapes small: rl/rollout.py's `width_multiple`)."""
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return [list(range(len(microbatches)))]
        groups: dict[tuple, list[int]] = {}
        for i, mb in enumerate(microbatches):
            groups.setdefault(tuple(mb["tokens"].shape), []).append(i)
        return list(groups.values())

    def forward_backward(self, microbatches: list[dict], loss_fn: LossFn | None,
                         forward_only: bool = False) -> list[dict]:
        """Run the micro-batches through megatron's schedule; gradients accumulate over all of
        them and are reduced and normalised once, by the total count (engine's loss convention),
        however many schedule calls their shapes need."""
        groups = self._shape_groups(microbatches)
        finalize = self.tconfig.finalize_model_grads_func
        counts: list[torch.Tensor] = []
        results: list = [None] * len(microbatches)
        try:
            for n, group in enumerate(groups):
                if finalize is not None and not forward_only and len(groups) > 1:
                    self.tconfig.finalize_model_grads_func = _deferred_finalize(
                        finalize, counts, last=n == len(groups) - 1)
                outputs = self._schedule_call([microbatches[i] for i in group], loss_fn, forward_only)
                for i, out in zip(group, outputs):  # outputs exist on the last stage only
                    results[i] = out
        finally:
            self.tconfig.finalize_model_grads_func = finalize
        return [r for r in results if r is not None]

    def _schedule_call(self, microbatches: list[dict], loss_fn: LossFn | None, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        microbatches, seq, batch = self._prepare(microbatches)
        return get_forward_backward_func()(
            forward_step_func=self._forward_step(loss_fn), data_iterator=iter(microbatches),
            model=[self.module], num_microbatches=len(microbatches), seq_length=seq,
            micro_batch_size=batch, forward_only=forward_only)

    def train_step(self, microbatches: list[dict], loss_fn: LossFn) -> dict:
        """One optimizer step over the micro-batches (a mini-batch on this DP rank); skipped
        (update_ok False, grad_norm NaN) when any rank's loss or gradients are non-finite."""
        self.module.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = self.forward_backward(microbatches, loss_fn)
        if not step_is_finite(self.module, stats):  # skip: NaN must not reach the weights
            self.module.zero_grad_buffer()
            self.optimizer.zero_grad()
            return {"stats": stats, "grad_norm": float("nan"), "update_ok": False}
        update_ok, grad_norm, _ = self.optimizer.step()
        return {"stats": stats, "grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                "update_ok": bool(update_ok)}

    @torch.no_grad()
    def forward(self, microbatches: list[dict], with_entropy: bool = True) -> list[dict]:
        """Per-token log-probs (entropy unless `with_entropy=False`) and values for each
        micro-batch, on every pipeline rank.

        Outputs are [b, s] aligned with `labels` (position t scores label t = token t+1).
        """
        self.module.eval()
        self._with_entropy = with_entropy
        try:
            outputs = self.forward_backward(microbatches, None, forward_only=True)
        finally:
            self._with_entropy = True
        return self._broadcast_from_last_stage(outputs, microbatches, with_entropy)

    def _broadcast_from_last_stage(self, outputs: list[dict], microbatches: list[dict],
                                   with_entropy: bool = True) -> list[dict]:
        from megatron.core import parallel_state as ps

        if ps.get_pipeline_model_parallel_world_size() == 1:
            return outputs
        group, src = ps.get_pipeline_model_parallel_group(), ps.get_pipeline_model_parallel_last_rank()
        keys = ["logprobs"] + (["entropy"] if with_entropy else []) + (["values"] if self._has_value_head() else [])
        if self.value_only:
            keys = ["values"]
        widths = self._call_widths(microbatches)
        result = []
        for i, mb in enumerate(microbatches):
            b, s = mb["tokens"].shape[0], widths[i]
            packed = (torch.stack([outputs[i][k] for k in keys]) if self.is_last_stage
                      else torch.empty(len(keys), b, s))
            packed = packed.float().contiguous()
            dist.broadcast(packed, src=src, group=group)
            result.append(dict(zip(keys, packed.unbind(0))))
        return result

    def _call_widths(self, microbatches: list[dict]) -> list[int]:
        """Each micro-batch's width as run: the widest of its schedule call."""
        widths = [0] * len(microbatches)
        for group in self._shape_groups(microbatches):
            seq = max(microbatches[i]["tokens"].shape[1] for i in group)
            for i in group:
                widths[i] = seq
        return widths

    def _has_value_head(self) -> bool:
        from megatron.core import parallel_state as ps

        flag = torch.tensor([1 if self.gpt.value_head is not None else 0])
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ps.get_pipeline_model_parallel_group())
        return bool(flag.item())

    def parameters_fingerprint(self) -> float:
        """Sum of all weights over all ranks (a cheap equality check in tests)."""
        total = torch.zeros((), dtype=torch.float64)
        for p in self.gpt.parameters():
            total += p.detach().double().sum()
        return float(total)

    def unwrapped(self):
        return unwrap(self.module)


def fuse_cpu_adam(optimizer) -> None:
    """Without Transformer Engine or apex, megatron-core steps torch's Adam(W), which on a CPU
    defaults to one tensor at a time: a Python loop of ~8 elementwise passes per parameter.
    torch's fused kernel (CPU since torch 2.4) makes the same update in one pass per tensor —
    ~5x faster for a `cpu-small` model, equal to rounding (tests/test_speed_paths.py). GPU
    parameters keep torch's default (foreach), and TE's/apex's FusedAdam is left alone."""
    for megatron_optimizer in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(megatron_optimizer, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            if group.get("fused") is None and all(p.device.type == "cpu" and p.is_floating_point()
                                                 for p in group["params"]):
                group["fused"], group["foreach"] = True, False


def _freeze_unused_output_layer(gpt) -> None:
    """A value-only model does not train its output layer. Tied embeddings keep it trainable:
    it is the input embedding (PP=1) or the copy megatron keeps in sync with it (PP>1)."""
    layer = getattr(gpt, "output_layer", None)
    if layer is not None and not gpt.share_embeddings_and_output_weights:
        for param in layer.parameters():
            param.requires_grad_(False)
