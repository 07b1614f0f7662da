"""ppo.old_logprobs_from_rollout: the rollout engine's own scores of its sampled tokens (log-prob
and entropy at the engine's temperature, value head on the same hidden state) equal the policy's
recompute pass (`Engine.forward` on the built rollout batch) at the action positions, in fp32:

- greedy with EOS stops (unequal lengths), T=1 sampling, T=0.7 with top-k (engine scoring at 0.7),
  chunked decoding with row compaction (unequal response caps), continuous batching (`slots=`);
- at TP{1,2} × PP{1,2} (one spawned job per layout; tiny llama, vocabulary 200, value head), every
  rank returning the same scores;
- a PPO step of the trainer with the option on gives the loss statistics and gradient norm of
  the step with it off (same seed, same rollouts).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5
VOCAB = 200
LAYOUTS = {"tp1pp1": (1, 1, 1), "tp2pp1": (2, 1, 2), "tp1pp2": (1, 2, 2), "tp2pp2": (2, 2, 4)}
PROMPT_LENGTHS = (3, 6, 2, 4, 5, 3)
CAPS = [9, 2, 12, 5, 1, 7]  # unequal response lengths: compaction and continuous admission happen
NAMES = {"logprobs": "logprobs", "entropy": "entropies", "values": "values"}


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB - 1, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _cases(engine):
    """name → (SamplingParams, generate kwargs, engine scoring temperature, eos id)."""
    from megatron_reft.generation import SamplingParams

    greedy = SamplingParams(max_new_tokens=12, greedy=True, max_total_length=24)
    free = SamplingParams(max_new_tokens=12, max_total_length=24, ignore_eos=True)
    return {
        "greedy_eos": (greedy, {}, 1.0, None),  # eos: a token greedy decoding emits (below)
        "sampled_t1": (free, {"seed": 3}, 1.0, 0),
        "t07_top_k": (SamplingParams(max_new_tokens=12, max_total_length=24, temperature=0.7, top_k=20,
                                     ignore_eos=True), {"seed": 4}, 0.7, 0),
        "compaction": (free, {"seed": 5, "response_caps": CAPS}, 1.0, 0),
        "continuous": (free, {"seed": 6, "response_caps": CAPS, "slots": 2}, 1.0, 0),
    }


def _captured_vs_recomputed(engine, prompts, params, kwargs, temperature, eos) -> dict:
    """Generate with scores, recompute them with Engine.forward, return both at the actions."""
    from megatron_reft.generation import generate
    from megatron_reft.rl.rollout import build_rollout_batch, gather_forward, micro_batches

    engine.temperature = temperature
    out = generate(engine, prompts, eos, params, return_logprobs=True, **kwargs)
    scores = {name: getattr(out, field) for name, field in NAMES.items()}
    batch = build_rollout_batch(prompts, out.tokens, out.finished, 0, scores)
    mbs = micro_batches(batch, list(range(batch.size)), 2)
    recomputed = engine.forward(mbs)
    engine.temperature = 1.0
    mask = batch.action_mask
    return {"tokens": out.tokens, "finished": out.finished,
            "captured": {k: v * mask for k, v in batch.rollout_outputs.items()},
            "recomputed": {k: gather_forward(recomputed, k, mbs, batch) * mask for k in NAMES}}


def _layout_worker(rank, world, tp, pp):
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.generation import generate
    from megatron_reft.models.families import model_config_from_preset

    torch.set_num_threads(1)
    initialize(tp, pp, seed=3)
    # init_std 0.2: peaked logits, so the layouts' greedy choices are not rounding-decided
    engine = Engine(model_config_from_preset("tiny-llama", vocab_size=VOCAB, init_std=0.2), with_value_head=True)
    engine.init_from_scratch(5)
    prompts = _prompts()
    results = {}
    for name, (params, kwargs, temperature, eos) in _cases(engine).items():
        if eos is None:  # stop prompt 1 at its 3rd greedy token: sequences end at different steps
            eos = generate(engine, prompts, VOCAB - 1, params).tokens[1][2]
        results[name] = _captured_vs_recomputed(engine, prompts, params, kwargs, temperature, eos)
    shutdown()
    return results


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def layout(request):
    tp, pp, world = LAYOUTS[request.param]
    return request.param, run_distributed(_layout_worker, world, tp, pp, init_process_group=False,
                                          timeout_s=300)


def test_captured_scores_equal_the_recompute_pass(layout):
    name, ranks = layout
    for case, r in ranks[0].items():
        for key in NAMES:
            torch.testing.assert_close(r["captured"][key], r["recomputed"][key], atol=TOL, rtol=0,
                                       msg=lambda m: f"{name} {case} {key}: {m}")
    lengths = [len(t) for t in ranks[0]["compaction"]["tokens"]]
    assert lengths == CAPS and [len(t) for t in ranks[0]["continuous"]["tokens"]] == CAPS
    eos = ranks[0]["greedy_eos"]
    assert any(eos["finished"]) and not all(eos["finished"])  # unequal stops really happened


def test_every_rank_gets_the_same_scores(layout):
    _, ranks = layout
    for other in ranks[1:]:
        for case, r in other.items():
            assert r["tokens"] == ranks[0][case]["tokens"]
            for key in NAMES:
                assert torch.equal(r["captured"][key], ranks[0][case]["captured"][key]), (case, key)


def _no_value_head_worker(rank, world):
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.models.families import model_config_from_preset

    torch.set_num_threads(1)
    initialize(1, 1, seed=3)
    engine = Engine(model_config_from_preset("tiny-llama", vocab_size=VOCAB))
    engine.init_from_scratch(5)
    params = SamplingParams(max_new_tokens=4, max_total_length=24)
    out = generate(engine, _prompts(), 0, params, seed=1, return_logprobs=True)
    plain = generate(engine, _prompts(), 0, params, seed=1)
    shutdown()
    return out, plain


def test_without_value_head_values_are_none_and_tokens_unchanged():
    out, plain = run_distributed(_no_value_head_worker, 1, init_process_group=False, timeout_s=120)[0]
    assert out.values is None and plain.logprobs is None
    assert out.tokens == plain.tokens  # scoring draws no random numbers
    assert [len(x) for x in out.logprobs] == [len(t) for t in out.tokens] == [len(x) for x in out.entropies]
    assert all(lp <= 0 for row in out.logprobs for lp in row)


def test_token_scores_are_the_full_distribution_before_filtering():
    from megatron_reft.generation.sampling import token_logprobs_and_entropy

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    tokens = torch.tensor([4, 0, 49])
    lp, ent = token_logprobs_and_entropy(logits, tokens, temperature=0.7)
    logp = torch.log_softmax(logits.double() / 0.7, dim=-1)
    torch.testing.assert_close(lp.double(), logp.gather(1, tokens[:, None])[:, 0], atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)


def test_at_actions_places_response_token_j_at_label_p_minus_1_plus_j():
    from megatron_reft.rl.rollout import build_rollout_batch

    batch = build_rollout_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], [True, False], 0,
                                {"logprobs": [[-0.5, -1.5], [-1.0, -2.0, -3.0]]})
    placed = batch.rollout_outputs["logprobs"]
    assert placed[0].tolist() == [0.0, 0.0, -0.5, -1.5]
    assert placed[1].tolist() == [-1.0, -2.0, -3.0, 0.0]
    assert torch.equal(placed != 0, batch.action_mask != 0)


# ------------------------------------------------------------------ the PPO trainer
def _ppo_steps(out_dir: str, overrides: list[str]) -> list[dict]:
    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import shutdown
    from megatron_reft.rl.trainer import PPOTrainer

    config = load_config(str(REPO / "configs" / "tiny_cpu.yaml"), [
        f"trainer.output_dir={out_dir}", "trainer.max_steps=2", "trainer.save_interval=1000",
        "trainer.eval_interval=1000", "trainer.progress_bar=false", "trainer.tensorboard=false",
        "data.synthetic_train_items=16", "data.synthetic_eval_items=2", "ppo.rollout_batch_size=4",
        "trainer.micro_batch_size=2", "data.max_total_length=40", "optim.lr=1e-3", *overrides])
    PPOTrainer(config).train()
    shutdown()
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def _ppo_worker(rank, world, out_dir, overrides):
    from megatron_reft.engine import Engine

    torch.set_num_threads(1)
    forward, calls = Engine.forward, []

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    Engine.forward = counted  # this spawned process only
    off = _ppo_steps(f"{out_dir}/off", overrides)
    forwards_off = len(calls)
    on = _ppo_steps(f"{out_dir}/on", ["ppo.old_logprobs_from_rollout=true", *overrides])
    return off, on, forwards_off, len(calls) - forwards_off


@pytest.mark.parametrize("overrides", [[], ["critic.mode=separate"]], ids=["shared", "separate-critic"])
def test_ppo_steps_with_rollout_logprobs_equal_the_recompute(tmp_path, overrides):
    off, on, forwards_off, forwards_on = run_distributed(_ppo_worker, 1, str(tmp_path), overrides,
                                                         init_process_group=False, timeout_s=600)[0]
    assert len(off) == len(on) == 2
    assert forwards_on == forwards_off - 2  # one policy log-prob pass less per step
    for a, b in zip(off, on):
        assert a["response_length"] == b["response_length"] and a["reward_mean"] == b["reward_mean"]
        assert b["ratio_mean"] == pytest.approx(a["ratio_mean"], abs=1e-5)
        for key in ("policy_loss", "value_loss", "kl", "entropy", "grad_norm", "explained_variance",
                    "approx_kl", "clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
