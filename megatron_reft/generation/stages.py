"""One generation forward step of this rank's model chunk, and token agreement across ranks.

Generation runs the pipeline stages one after the other for each step (stage i receives the
hidden states of stage i-1, runs its layers, sends them on); the last stage turns the last
position's hidden state into full-vocabulary logits. Only ONE rank samples — TP rank 0 of the
last stage — and broadcasts the tokens to the whole model-parallel group (TP × PP), so every
rank continues with the same tokens by construction, not by hoping that identically seeded
generators on different ranks see bit-identical logits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_reft.generation.sampling import sample_and_score
from megatron_reft.models.output_projection import vocab_logits

SCORES = 3  # per sampled token: log-prob, entropy, value (StageRunner.sample_scored)


class StageRunner:
    def __init__(self, gpt, true_vocab: int):
        from megatron.core import parallel_state as ps

        self.gpt = gpt
        self.true_vocab = true_vocab
        self.is_first = ps.is_pipeline_first_stage()
        self.is_last = ps.is_pipeline_last_stage()
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        if self.pp_size > 1:
            self.prev_rank = ps.get_pipeline_model_parallel_prev_rank()
            self.next_rank = ps.get_pipeline_model_parallel_next_rank()
        self.mp_group = ps.get_model_parallel_group()
        self.mp_size = dist.get_world_size(self.mp_group)
        self.is_sampler = self.is_last and ps.get_tensor_model_parallel_rank() == 0
        self.device = next(gpt.parameters()).device
        self.sampler_rank = self._find_sampler_rank()
        self.masks_while_decoding = masks_while_decoding(gpt)

    def _find_sampler_rank(self) -> int:
        """Global rank of this model-parallel group's sampler (one collective, once per call)."""
        if self.mp_size == 1:
            return dist.get_rank()
        mine = torch.tensor([dist.get_rank() if self.is_sampler else -1], device=self.device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.mp_group)
        return int(mine.item())

    def last_logits(self, tokens: torch.Tensor, positions: torch.Tensor, mask, context,
                    choosing: torch.Tensor | None = None) -> torch.Tensor | None:
        """Run this stage on tokens [b, s]; on the last stage return the last position's
        logits [b, true_vocab] in fp32, elsewhere None (after passing the activations on).
        `choosing` [b] bool: the rows whose token this step chooses; the others (still feeding
        their prompt, or finished) skip the output layer — the largest matmul of a decode step
        with a big vocabulary — and get logits 0, which the caller discards (the sampler still
        draws for every row, so the random stream and every chosen token stay the same)."""
        batch, seq = tokens.shape
        if not self.is_first:
            self.gpt.set_input_tensor(self._receive(seq, batch))
        hidden = self.gpt(tokens if self.is_first else None, positions, mask,
                          inference_context=context, return_hidden=True)
        if not self.is_last:
            dist.send(hidden.contiguous(), dst=self.next_rank, group=self.pp_group)
            return None
        last = hidden[-1:]  # [1, b, h]: the position that predicts the next token
        self.last_hidden = last  # post final norm: what the training forward's value head reads
        chosen_rows = batch if choosing is None else int(choosing.sum())  # one read, not any() and all()
        if chosen_rows == 0:  # e.g. a prefill whose tokens all follow
            return last.new_zeros(batch, self.true_vocab, dtype=torch.float32)
        weight = self.gpt.output_weight()
        if chosen_rows < batch:
            chosen = vocab_logits(self.gpt.output_layer, last[:, choosing], weight, gather_output=True)
            logits = chosen.new_zeros(1, batch, chosen.shape[-1])
            logits[:, choosing] = chosen
        else:
            logits = vocab_logits(self.gpt.output_layer, last, weight, gather_output=True)
        # The vocabulary is padded for TP divisibility: padded ids must never be sampled.
        return logits[0, :, :self.true_vocab].float()

    def sample_scored(self, logits: torch.Tensor, params, generator, temperature: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampler: the next tokens [b] (the draws `next_tokens` makes) and [b, SCORES] per
        token — log-prob and entropy of the full distribution at `temperature`, and the value
        head's output on the same post-norm hidden state the logits came from (engine.py
        `_last_stage_loss` applies it there too; 0 without a head)."""
        tokens, logprobs, entropy = sample_and_score(logits, params, generator, temperature)
        head = self.gpt.value_head
        values = head(self.last_hidden)[0, :, 0].float() if head is not None else torch.zeros_like(entropy)
        return tokens, torch.stack([logprobs, entropy, values], dim=1)

    def has_value_head(self) -> bool:
        """Whether the last stage holds a value head, known on every rank of the group."""
        flag = torch.tensor([1 if getattr(self.gpt, "value_head", None) is not None else 0], device=self.device)
        if self.mp_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.mp_group)
        return bool(flag.item())

    def _receive(self, seq: int, batch: int) -> torch.Tensor:
        config = self.gpt.config
        buf = torch.empty(seq, batch, config.hidden_size, dtype=config.params_dtype, device=self.device)
        dist.recv(buf, src=self.prev_rank, group=self.pp_group)
        return buf

    def share(self, tokens: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The sampler's tokens [batch] on every rank of the model-parallel group."""
        if self.mp_size == 1:
            return tokens
        buf = tokens.contiguous() if self.is_sampler else torch.empty(batch, dtype=torch.long, device=self.device)
        dist.broadcast(buf, src=self.sampler_rank, group=self.mp_group)
        return buf

    def share_scored(self, tokens: torch.Tensor | None, scores: torch.Tensor | None,
                     batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler's tokens [batch] and their scores [batch, SCORES] on every rank, in the
        one broadcast that shares tokens anyway: packed as float64, which holds token ids and
        fp32 values exactly."""
        if self.mp_size == 1:
            return tokens, scores
        if self.is_sampler:
            buf = torch.cat([tokens.unsqueeze(1).double(), scores.double()], dim=1).contiguous()
        else:
            buf = torch.empty(batch, 1 + SCORES, dtype=torch.float64, device=self.device)
        dist.broadcast(buf, src=self.sampler_rank, group=self.mp_group)
        return buf[:, 0].long(), buf[:, 1:].float()


def masks_while_decoding(gpt) -> bool:
    """Whether this model's core attention applies a padding mask to one-token decode steps
    (right-aligned prompts and continuous batching need it). megatron's local attention (and
    models/sdpa_attention.py's subclass) applies any mask it is given, unless a sliding window
    replaces it; Transformer Engine's follows the mask type, which megatron-core 0.16.1 switches to
    `no_mask` past the prefill, so it would not. Same answer on every rank: one layer spec."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    cores = [m.core_attention for m in gpt.modules() if hasattr(m, "core_attention")]
    return bool(cores) and all(isinstance(c, DotProductAttention) and c.scale_mask_softmax.window_size is None
                               for c in cores)
