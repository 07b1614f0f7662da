"""The rollout engine's decode step at fixed shapes, replayed as a CUDA graph on a GPU
(docs/architecture.md, "Captured decode step").

On a GPU a decode step of a small or mid-sized model is host-bound: the H200 spent 42.8 ms of
host work per llama-1b step against ~1–2 ms of kernels (docs/benchmarks.md, "First GPU run").
A CUDA graph replays the step's kernels without that host work, but only if nothing in the step
depends on Python values that change between steps. megatron-core 0.16.1's static path slices
the KV cache at `sequence_len_offset` (a Python int), so this step reads everything that varies
from tensors loaded before each replay:

- the fed tokens and their positions ([rows, 1]: each row's own previous token and position,
  as in continuous batching's step — generate.py `_forward_own_slots`);
- each row's start slot and the write slot, from which the step builds its own mask: a row sees
  cache slots [start, write slot];
- the KV cache is written at the write slot with `index_copy_` and read whole
  (models/sdpa_attention.py `write_static_slot`); RoPE angles are gathered by position.

Its logits equal the eager step's to rounding (attention over all slots, the hidden ones
weighted exactly 0; tests/test_static_step.py runs it eagerly on CPU against the engine, at TP 1
and 2, both families, every prompt scheme). On CUDA with one model-parallel rank each batch
size is captured once per `generate()` call (the graph holds the addresses of that call's KV
cache) and replayed; batch sizes are rounded up to a power of two (≤ the batch's width) so that
compaction needs a few graphs, not one per size. The sampler stays outside the graph.
"""
from __future__ import annotations

import warnings

import torch

from megatron_reft.models.output_projection import vocab_logits


def supports_static_step(gpt) -> str | None:
    """None if every attention layer of this model chunk takes the static step's cache write
    (the local SDPA layer spec's), else why not."""
    from megatron_reft.models.inference_layer import _lean_layer

    layers = list(gpt.decoder.layers)
    if not all(getattr(getattr(layer, "self_attention", None), "writes_static_slot", False) for layer in layers):
        return "needs the local layer spec with SDPA attention (model.use_te: false, model.attention: sdpa)"
    if not all(_lean_layer(layer) for layer in layers):
        return "needs layers without recompute, offloading, MoE or fused bias-dropout (the lean decode forward)"
    return None


class StaticDecoder:
    """Decode steps of one `generate()` call at fixed shapes; captured as CUDA graphs on a GPU
    with one model-parallel rank, else run eagerly (the same computation)."""

    def __init__(self, stage, context):
        self.stage, self.context = stage, context
        self.capture = stage.device.type == "cuda" and stage.mp_size == 1
        self.cache_slots = torch.arange(context.max_sequence_length, device=stage.device)
        self.steps: dict[int, _Step] = {}

    def logits(self, batch, end: int) -> torch.Tensor:
        """Logits [n, vocab] choosing cache slot `end` for the active rows (each fed its token
        at slot `end - 1`, its own position `end - 1 - start`)."""
        rows, n = batch.active, batch.n
        # Finished rows awaiting a successor run on past their end: clamp, their outputs are unused.
        fed = (batch.local(end) - 1).clamp(max=batch.tokens.shape[1] - 1)
        if not self.steps:
            self._clear_unwritten(end - 1)
        step = self._step(n)
        step.load(batch.tokens[rows, fed], fed, batch.start[rows], end - 1, n)
        if self.capture and step.graph is None:
            self._capture(step)
        if step.graph is not None:
            step.graph.replay()
        else:
            step.last_hidden, step.logits = step.forward()
        self.stage.last_hidden = step.last_hidden[:, :n]  # what sample_scored's value head reads
        return step.logits[:n]

    def _clear_unwritten(self, first_write: int) -> None:
        """Zero every layer's cache from the first write slot on: the step reads the whole cache,
        and a hidden slot's probability 0 times a never-written NaN is still NaN. Slots before it
        hold the prompts' keys and values (or zeros where a row's prompt starts later)."""
        for memories in self.context.key_value_memory_dict.values():
            for memory in memories:
                memory[first_write:].zero_()

    def _step(self, n: int) -> "_Step":
        # the next power of two, at most the cache's rows (the batch's width)
        rows = min(self.context.max_batch_size, 1 << (n - 1).bit_length())
        if rows not in self.steps:
            self.steps[rows] = _Step(self, rows)
        return self.steps[rows]

    def _capture(self, step: "_Step") -> None:
        """Record `step.forward` as a CUDA graph. The warm-up runs (allocator, kernel choices,
        compiles outside the graph) compute this very step, so their KV write is the one the
        replay makes again. A step that cannot be captured runs eagerly from then on, with a warning."""
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # the second run after any lazy compile (megatron's torch.compile'd SwiGLU)
                    step.forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step.last_hidden, step.logits = step.forward()
            step.graph = graph
        except RuntimeError as error:  # e.g. a host sync inside a kernel path of this build
            warnings.warn(f"decode step not captured as a CUDA graph ({str(error).splitlines()[0]}); "
                          "running it eagerly", RuntimeWarning, stacklevel=2)
            self.capture = False


class _Step:
    """Input buffers and the forward of one batch size (`rows` cache rows from row 0)."""

    def __init__(self, decoder: StaticDecoder, rows: int):
        device = decoder.stage.device
        self.decoder, self.rows = decoder, rows
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.starts = torch.zeros(rows, dtype=torch.long, device=device)
        self.write_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.graph = None
        self.last_hidden = self.logits = None

    def load(self, tokens, positions, starts, write_slot: int, n: int) -> None:
        """This step's inputs for rows [0, n); rows [n, rows) (padding up to the graph's size)
        feed token 0 at position 0 and see only the slot they write — cache rows of finished
        sequences or free rows, whose outputs are never read."""
        self.tokens[:n, 0] = tokens
        self.positions[:n, 0] = positions
        self.starts[:n] = starts
        self.write_slot.fill_(write_slot)
        if n < self.rows:
            self.tokens[n:] = 0
            self.positions[n:] = 0
            self.starts[n:] = self.write_slot

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(last hidden state [1, rows, h] after the final norm, fp32 logits [rows, vocab])."""
        decoder = self.decoder
        stage, context, gpt = decoder.stage, decoder.context, decoder.stage.gpt
        slots = decoder.cache_slots
        hidden_slots = (slots < self.starts[:, None]) | (slots > self.write_slot)  # [rows, cache slots]
        context.write_slot = self.write_slot  # read by the attention's cache update
        context.row_positions = self.positions[:, 0]  # RoPE by each row's own position
        context._reft_rotation = None  # the step's angles are cached per step; these buffers outlive it
        context.sequence_len_offset = None  # nothing in this step may read it: a replay would keep it
        context.enable_decode_mode()
        try:
            hidden = gpt(self.tokens, self.positions, hidden_slots[:, None, None, :], inference_context=context,
                         return_hidden=True)
        finally:
            context.write_slot = None
        last = hidden[-1:]
        logits = vocab_logits(gpt.output_layer, last, gpt.output_weight(), gather_output=True)
        return last, logits[0, :, :stage.true_vocab].float()
