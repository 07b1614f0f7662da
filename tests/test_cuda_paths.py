"""On a CUDA GPU, one PPO step equals the same step on the CPU, and decode steps replayed as CUDA
graphs decode what the eager engine decodes (skipped without a GPU).

Every job builds its batches on the host (data loaders, rollout batches) and the PPO math runs
beside them; the engine copies each micro-batch to the model's device, and host-side statistics
are all-reduced over gloo next to NCCL. The step runs in fp32 in two processes, one that sees the
GPU and one that does not (CUDA_VISIBLE_DEVICES=""), from the same seeds: log-probs, values,
loss statistics, the log-probs after the update and KV-cached decoding logits must agree to
fp32 rounding.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA GPU: compares a PPO step on the GPU with the CPU's")


def _ppo_step(rank, world):
    torch.set_num_threads(1)
    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.models.families import model_config_from_preset
    from megatron_reft.rl import ppo_math
    from megatron_reft.rl.rollout import build_rollout_batch, gather_forward, micro_batches
    from megatron_reft.rl.trainer import ppo_loss_fn, reduce_stats

    initialize(1, 1, seed=3)
    model_cfg = model_config_from_preset("tiny-llama", vocab_size=200)
    engine = Engine(model_cfg, dtype=torch.float32, with_value_head=True, optim=OptimSettings(lr=1e-2))
    engine.init_from_scratch(5)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (3, 5, 4, 3)]
    responses = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (6, 2, 4, 5)]
    batch = build_rollout_batch(prompts, responses, [True] * 4, pad_id=0)  # on the host
    mbs = micro_batches(batch, list(range(4)), 2, token_budget=16)
    old = engine.forward(mbs)
    old_logprobs, values = gather_forward(old, "logprobs", mbs, batch), gather_forward(old, "values", mbs, batch)
    assert old_logprobs.device.type == "cpu" and values.device.type == "cpu"
    ref_logprobs = old_logprobs + 0.05 * torch.randn(old_logprobs.shape, generator=g)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5])
    rewards, _ = ppo_math.kl_penalized_rewards(scores, old_logprobs, ref_logprobs, batch.action_mask, 0.05)
    advantages, returns = ppo_math.gae_advantages(rewards, values, batch.action_mask)
    advantages = ppo_math.whiten_advantages(advantages, batch.action_mask)
    batch.tensors.update(old_logprobs=old_logprobs, values=values, advantages=advantages, returns=returns)
    engine.module.train()
    result = engine.train_step(micro_batches(batch, list(range(4)), 1), ppo_loss_fn(load_config(None, [])))
    stats = reduce_stats(result["stats"])  # a host tensor all-reduced: gloo beside NCCL on a GPU
    after = gather_forward(engine.forward(mbs), "logprobs", mbs, batch)
    device = str(next(engine.gpt.parameters()).device.type)
    decoded = _cached_decode_logits(engine, torch.randint(3, 200, (3, 9), generator=g))
    shutdown()
    mask = batch.action_mask
    return {"device": device, "old": old_logprobs * mask, "values": values * mask, "after": after * mask,
            "stats": stats, "grad_norm": result["grad_norm"], "decoded": decoded}


def _cached_decode_logits(engine, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a 4-token prefill and of 5 KV-cached one-token steps (the rollout engine's
    decode path: the no-grad linears, the once-per-step RoPE, SDPA against the cache)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_reft.generation.stages import StageRunner

    engine.gpt.eval()
    stage = StageRunner(engine.gpt, engine.model_config.vocab_size)
    device = next(engine.gpt.parameters()).device
    tokens = tokens.to(device)
    b, s = tokens.shape
    context = StaticInferenceContext(b, s)
    positions = torch.arange(s, device=device).expand(b, s)
    with torch.no_grad():
        steps = [stage.last_logits(tokens[:, :4], positions[:, :4], None, context)]
        for t in range(4, s):
            context.sequence_len_offset = t
            context.enable_decode_mode()
            steps.append(stage.last_logits(tokens[:, t:t + 1], positions[:, t:t + 1], None, context))
    return torch.stack(steps).cpu()


def test_ppo_step_on_gpu_equals_cpu(monkeypatch):
    gpu = run_distributed(_ppo_step, 1, init_process_group=False, timeout_s=300)[0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the spawned process sees no GPU
    cpu = run_distributed(_ppo_step, 1, init_process_group=False, timeout_s=300)[0]
    assert (gpu["device"], cpu["device"]) == ("cuda", "cpu")
    for key in ("old", "values", "after", "decoded"):
        torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-4, atol=1e-4, msg=key)
    assert not torch.equal(gpu["after"], gpu["old"])  # the update moved the policy
    assert gpu["grad_norm"] == pytest.approx(cpu["grad_norm"], rel=1e-4)
    for key, value in cpu["stats"].items():
        assert gpu["stats"][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


def _captured_decode(rank, world):
    """model.cuda_graph_decode on a GPU: decode steps replayed as CUDA graphs decode what the
    eager engine decodes (sampled tokens, log-probs and values to fp32 rounding), with
    megatron's RoPE table evicted from its cache before every step."""
    import warnings

    torch.set_num_threads(1)
    import megatron_reft.generation.static_step as static_step
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.models.families import model_config_from_preset

    initialize(1, 1, seed=5)
    decoders = []
    original_init = static_step.StaticDecoder.__init__

    def recorded(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        decoders.append(self)

    static_step.StaticDecoder.__init__ = recorded
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    original_logits = static_step.StaticDecoder.logits

    def evicting(self, batch, end):
        """Before every step: megatron's LRU-cached RoPE table dropped and freed blocks refilled
        with NaN — a graph that read the table without holding it would read NaN."""
        RotaryEmbedding.forward.cache_clear()
        junk = [torch.full((n,), float("nan"), device="cuda") for n in (256, 1024, 4096) for _ in range(32)]
        logits = original_logits(self, batch, end)
        del junk
        return logits

    static_step.StaticDecoder.logits = evicting
    prompts = [[5, 9, 14], [7, 3, 8, 22, 41, 6], [11, 12], [30, 31, 32, 33], [9, 9, 9, 9, 9], [4, 17, 2]]
    caps = [9, 1, 8, 1, 1, 7]
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for preset in ("tiny-llama", "tiny-opt"):
            engine = Engine(model_config_from_preset(preset, vocab_size=200), dtype=torch.float32, with_value_head=True)
            engine.init_from_scratch(11)
            for scheme, kwargs in (("fed", {"align_prompts": False}), ("continuous", {"slots": 3})):
                for static in (False, True):
                    s = generate(engine, prompts, 1, SamplingParams(max_new_tokens=9, max_total_length=20), seed=3,
                                 static_decode=static, return_logprobs=True, response_caps=caps, **kwargs)
                    out[(preset, scheme, static)] = (s.tokens, s.logprobs, s.values)
    shutdown()
    graphs = sum(step.graph is not None for d in decoders for step in d.steps.values())
    not_captured = [str(w.message) for w in caught if "not captured" in str(w.message)]
    return {"out": out, "graphs": graphs, "capturing": [d.capture for d in decoders], "not_captured": not_captured}


def test_captured_decode_steps_decode_what_the_eager_engine_decodes():
    r = run_distributed(_captured_decode, 1, init_process_group=False, timeout_s=300)[0]
    assert not r["not_captured"] and all(r["capturing"]) and r["graphs"] >= 4, r
    for (preset, scheme, static), (tokens, logprobs, values) in r["out"].items():
        if not static:
            continue
        eager_tokens, eager_logprobs, eager_values = r["out"][(preset, scheme, False)]
        assert tokens == eager_tokens, (preset, scheme)
        for got, want in ((logprobs, eager_logprobs), (values, eager_values)):
            diff = max(abs(x - y) for u, v in zip(got, want) for x, y in zip(u, v))
            assert diff < 1e-4, (preset, scheme, diff)
