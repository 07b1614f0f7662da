"""Check a conversion by running both models: largest logit difference, greedy agreement.

The megatron side runs at whatever TP × PP the process was started with (one process by
default; under torchrun pass --tp/--pp) and loads the checkpoint through checkpoint/io.py, so
this also checks that the checkpoint loads at that layout. Greedy decoding here is a plain
no-cache loop: slow but obviously right, which is what a check needs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

DEFAULT_PROMPTS = (
    "def fibonacci(n):",
    "Question: Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
    "The mitochondria is",
)


@torch.no_grad()
def megatron_logits(gpt, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, vocab_size] of a megatron GPTModel chunk at any TP × PP.

    Returns the logits on the last pipeline stage's ranks and None elsewhere. Activations move
    between stages with plain send/recv (forward only, one micro-batch).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    device = next(gpt.parameters()).device
    b, s = input_ids.shape
    input_ids = input_ids.to(device)
    positions = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), diagonal=1)[None, None]
    causal = causal.expand(b, 1, s, s)
    if not ps.is_pipeline_first_stage():
        hidden = torch.empty(s, b, gpt.config.hidden_size, dtype=gpt.config.params_dtype, device=device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        gpt.set_input_tensor(hidden)
    out = gpt(input_ids, positions, causal)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return gather_from_tensor_model_parallel_region(out)[..., :vocab_size].float().cpu()


@torch.no_grad()
def megatron_greedy(gpt, input_ids: torch.Tensor, vocab_size: int, new_tokens: int) -> torch.Tensor:
    """Greedy continuation [b, new_tokens], the same on every rank."""
    from megatron.core import parallel_state as ps

    device = next(gpt.parameters()).device  # NCCL broadcasts need device tensors
    ids = input_ids
    for _ in range(new_tokens):
        logits = megatron_logits(gpt, ids, vocab_size)
        nxt = logits[:, -1].argmax(-1) if logits is not None else torch.empty(ids.shape[0], dtype=torch.long)
        if ps.get_pipeline_model_parallel_world_size() > 1:
            nxt = nxt.to(device)
            dist.broadcast(nxt, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        ids = torch.cat([ids, nxt.cpu()[:, None]], dim=1)
    return ids[:, input_ids.shape[1]:]


@torch.no_grad()
def hf_greedy(hf_model, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    ids = input_ids
    for _ in range(new_tokens):
        nxt = hf_model(ids).logits[:, -1].argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    return ids[:, input_ids.shape[1]:]


def load_hf_model(hf_dir: str | Path, dtype: torch.dtype):
    import transformers

    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_dir), attn_implementation="eager", **{key: dtype})
    return model.eval()


def encode_prompts(prompts, hf_dir: Path, ckpt: Path, vocab_size: int) -> list[torch.Tensor]:
    """Token ids per prompt, with the checkpoint's (or HF dir's) tokenizer; random ids without one."""
    for candidate in (ckpt / "tokenizer", hf_dir):
        if candidate.is_dir() and any(candidate.glob("tokenizer*")):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(candidate))
            return [torch.tensor([tok(p)["input_ids"]]) for p in prompts]
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (1, 12), generator=gen) for _ in prompts]


def verify(hf_dir: str | Path, ckpt: str | Path, *, prompts=DEFAULT_PROMPTS, new_tokens: int = 8,
           dtype: torch.dtype = torch.float32, tp: int = 1, pp: int = 1) -> dict | None:
    """Run both models on the prompts; the report on the reporting rank (None on other ranks)."""
    from megatron_reft.checkpoint.io import load_checkpoint, read_model_yaml
    from megatron_reft.distributed import init as dist_init
    from megatron_reft.models.build import build_model

    hf_dir, ckpt = Path(hf_dir), Path(ckpt)
    model_cfg = read_model_yaml(ckpt)
    launch = dist_init.detect_launch_env()
    reporting = launch.rank == launch.world_size - 1  # a last pipeline stage rank
    # Load HF first: once the CPU compatibility layer is installed, `with torch.device("meta")`
    # no longer applies to the patched factories, and transformers' meta-device loading then
    # leaves RoPE's inv_freq buffer uninitialised.
    hf_model = load_hf_model(hf_dir, dtype) if reporting else None
    owns_process_group = not dist.is_initialized()  # a caller's group outlives this check
    dist_init.initialize(tp, pp)
    try:
        gpt = build_model(model_cfg, dtype=dtype)
        load_checkpoint(ckpt, gpt)
        gpt.eval()
        inputs = encode_prompts(prompts, hf_dir, ckpt, model_cfg.vocab_size)
        rows = []
        for prompt, ids in zip(prompts, inputs):
            logits = megatron_logits(gpt, ids, model_cfg.vocab_size)
            greedy = megatron_greedy(gpt, ids, model_cfg.vocab_size, new_tokens)
            if reporting:
                rows.append(_compare(prompt, ids, logits, greedy, hf_model, new_tokens))
    finally:
        if owns_process_group:
            dist_init.shutdown()
        else:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
    if not reporting:
        return None
    return {
        "hf_dir": str(hf_dir), "checkpoint": str(ckpt), "dtype": str(dtype).split(".")[-1],
        "tensor_parallel": tp, "pipeline_parallel": pp,
        "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
        "greedy_agree": all(r["greedy_agree"] for r in rows),
        "prompts": rows,
    }


def _compare(prompt, ids, logits, greedy, hf_model, new_tokens) -> dict:
    with torch.no_grad():
        hf_logits = hf_model(ids).logits.float()
    hf_tokens = hf_greedy(hf_model, ids, new_tokens)
    return {
        "prompt": prompt, "tokens": ids.shape[1],
        "max_abs_logit_diff": (logits - hf_logits[..., :logits.shape[-1]]).abs().max().item(),
        "greedy_agree": torch.equal(greedy, hf_tokens),
        "megatron_greedy": greedy[0].tolist(), "hf_greedy": hf_tokens[0].tolist(),
    }


def format_report(report: dict) -> str:
    return json.dumps(report, indent=1)
