"""The fixed-shape decode step (generation/static_step.py, `generate(..., static_decode=True)`,
`model.cuda_graph_decode`) decodes what the engine's own step decodes.

On CPU the step runs eagerly — the same computation a CUDA graph replays on a GPU
(tests/test_cuda_paths.py checks the replay). Against the default step, at TP 1 and 2, llama
(RoPE, GQA) and OPT (learned positions, biases), with every prompt scheme (fed, right-aligned,
continuous batching): greedy tokens equal, sampled tokens equal for the same seed, log-probs and
values to fp32 rounding (the step attends over the whole cache, hidden slots weighted 0).
Attackers: batches padded up to the graph's size (compaction), never-written cache slots full of
NaN, a step that would read the Python write offset, and layouts the step cannot run.
"""
from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

PROMPTS = [[5, 9, 14], [7, 3, 8, 22, 41, 6], [11, 12], [30, 31, 32, 33], [9, 9, 9, 9, 9], [4, 17, 2]]
CAPS = [9, 1, 8, 1, 1, 7]  # three finish at once: the batch compacts from 6 rows to 3, which a graph of 4 runs
SCHEMES = {"fed": {"align_prompts": False}, "aligned": {"align_prompts": True}, "continuous": {"slots": 3}}


def _step_worker(rank, world, tp):
    torch.set_num_threads(1)
    import megatron_reft.generation.static_step as static_step
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.models.families import model_config_from_preset

    initialize(tp, 1, seed=5)
    seen = {"steps": 0, "padded": 0}
    original_logits = static_step.StaticDecoder.logits

    def watched(decoder, batch, end):
        if not decoder.steps:  # never-written slots full of NaN: the step must clear what it reads
            for memories in decoder.context.key_value_memory_dict.values():
                for memory in memories:
                    memory[end - 1:] = float("nan")
        logits = original_logits(decoder, batch, end)
        seen["steps"] += 1
        seen["padded"] += decoder._step(batch.n).rows > batch.n
        return logits

    static_step.StaticDecoder.logits = watched
    greedy = SamplingParams(max_new_tokens=9, max_total_length=20, temperature=0.0)
    sample = SamplingParams(max_new_tokens=9, max_total_length=20)
    out = {}
    for preset in ("tiny-llama", "tiny-opt"):
        engine = Engine(model_config_from_preset(preset, vocab_size=200), with_value_head=True)
        engine.init_from_scratch(11)
        for scheme, kwargs in SCHEMES.items():
            for static in (False, True):
                g = generate(engine, PROMPTS, 1, greedy, seed=3, static_decode=static, response_caps=CAPS, **kwargs)
                s = generate(engine, PROMPTS, 1, sample, seed=3, static_decode=static, return_logprobs=True,
                             response_caps=CAPS, **kwargs)
                out[(preset, scheme, static)] = {"greedy": g.tokens, "sampled": s.tokens, "logprobs": s.logprobs,
                                                 "values": s.values, "finished": s.finished}
    shutdown()
    out["seen"] = seen
    return out


@pytest.fixture(scope="module", params=[1, 2], ids=["tp1", "tp2"])
def decoded(request):
    tp = request.param
    return run_distributed(_step_worker, tp, tp, init_process_group=False, timeout_s=600)


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max((abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)), default=0.0)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_static_step_decodes_what_the_engine_decodes(decoded, preset, scheme):
    for r in decoded:  # every TP rank returns the same output
        default, static = r[(preset, scheme, False)], r[(preset, scheme, True)]
        assert static["greedy"] == default["greedy"]
        assert static["sampled"] == default["sampled"] and static["finished"] == default["finished"]
        assert _max_diff(static["logprobs"], default["logprobs"]) < 1e-5
        assert _max_diff(static["values"], default["values"]) < 1e-5
        assert sum(map(len, static["sampled"])) > len(PROMPTS)  # decode steps happened


def test_static_step_ran_with_padded_batches_over_a_poisoned_cache(decoded):
    for r in decoded:
        # every static generate() decoded through the step, some at a padded size; the cache
        # slots it had not written were NaN when it started (the worker's watcher)
        assert r["seen"]["steps"] > 50 and r["seen"]["padded"] > 0


def _write_offset_worker(rank, world):
    """A step that read megatron's Python write offset would bake it into a CUDA graph: the
    static step sets it to None, so any reader fails here (checked by a read planted in the
    attention's cache update, which must then raise)."""
    torch.set_num_threads(1)
    import megatron_reft.models.sdpa_attention as sdpa_attention
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.models.families import model_config_from_preset

    initialize(1, 1, seed=5)
    engine = Engine(model_config_from_preset("tiny-opt", vocab_size=200))
    engine.init_from_scratch(11)
    params = SamplingParams(max_new_tokens=4, max_total_length=20, temperature=0.0)
    generate(engine, PROMPTS, 1, params, static_decode=True)  # fine as it is
    original = sdpa_attention.write_static_slot

    def reads_offset(attention, context, key, value):
        int(context.sequence_len_offset)  # what megatron's static path does with it
        return original(attention, context, key, value)

    sdpa_attention.write_static_slot = reads_offset
    try:
        generate(engine, PROMPTS, 1, params, static_decode=True)
        raised = None
    except TypeError as error:
        raised = str(error)
    finally:
        sdpa_attention.write_static_slot = original
        shutdown()
    return raised


def test_static_step_leaves_no_python_write_offset_to_read():
    raised = run_distributed(_write_offset_worker, 1, init_process_group=False, timeout_s=300)[0]
    assert raised is not None and "NoneType" in raised


def _refusal_worker(rank, world, pp, attention):
    torch.set_num_threads(1)
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.models.families import model_config_from_preset

    initialize(1, pp, seed=5)
    engine = Engine(model_config_from_preset("tiny-llama", vocab_size=200), attention=attention)
    engine.init_from_scratch(11)
    try:
        generate(engine, PROMPTS, 1, SamplingParams(max_new_tokens=3, max_total_length=20), static_decode=True)
        message = None
    except ValueError as error:
        message = str(error)
    shutdown()
    return message


@pytest.mark.parametrize("pp,attention,why", [(2, "sdpa", "one pipeline stage"),
                                              (1, "megatron", "local layer spec with SDPA")])
def test_static_step_refuses_layouts_it_cannot_run(pp, attention, why):
    for message in run_distributed(_refusal_worker, pp, pp, attention, init_process_group=False, timeout_s=300):
        assert message is not None and why in message


def test_config_rejects_cuda_graph_decode_where_the_step_cannot_run():
    from megatron_reft.config import load_config
    from megatron_reft.config.validate import _value_errors

    ok = load_config(None, ["model.cuda_graph_decode=true"])
    assert not [e for e in _value_errors(ok) if "cuda_graph_decode" in e]
    bad = load_config(None, ["model.cuda_graph_decode=true", "parallel.pipeline_model_parallel_size=2",
                             "model.attention=megatron"])
    errors = [e for e in _value_errors(bad) if e.startswith("model.cuda_graph_decode:")]
    assert len(errors) == 2 and "pipeline_model_parallel_size 1" in errors[0] and "SDPA" in errors[1]


def _ppo_worker(rank, world, out_dir):
    """Two PPO steps of the trainer (tiny CPU config) and a greedy eval with
    model.cuda_graph_decode off and on."""
    import json
    from pathlib import Path

    import megatron_reft.generation.static_step as static_step
    import megatron_reft.rl.trainer as trainer
    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import shutdown

    torch.set_num_threads(1)
    steps, in_eval, original, evaluate = [], [False], static_step.StaticDecoder.logits, trainer.greedy_accuracy

    def counted(decoder, batch, end):
        steps.append("eval" if in_eval[0] else "rollout")
        return original(decoder, batch, end)

    def flagged(*args, **kwargs):
        in_eval[0] = True
        try:
            return evaluate(*args, **kwargs)
        finally:
            in_eval[0] = False

    static_step.StaticDecoder.logits, trainer.greedy_accuracy = counted, flagged
    repo = Path(__file__).resolve().parents[1]
    runs = {}
    for on in (False, True):
        config = load_config(str(repo / "configs" / "tiny_cpu.yaml"), [
            f"trainer.output_dir={out_dir}/{on}", "trainer.max_steps=2", "trainer.save_interval=1000",
            "trainer.eval_interval=2", "trainer.progress_bar=false", "trainer.tensorboard=false",
            "data.synthetic_train_items=16", "data.synthetic_eval_items=6", "ppo.rollout_batch_size=4",
            "trainer.micro_batch_size=2", "data.max_total_length=40", "optim.lr=1e-3",
            f"model.cuda_graph_decode={str(on).lower()}"])
        trainer.PPOTrainer(config).train()
        shutdown()
        runs[on] = [json.loads(line) for line in (Path(out_dir) / str(on) / "metrics.jsonl").read_text().splitlines()]
    return runs[False], runs[True], {kind: steps.count(kind) for kind in ("rollout", "eval")}


def test_ppo_trainer_with_cuda_graph_decode_trains_and_evaluates_as_without(tmp_path):
    off, on, static_steps = run_distributed(_ppo_worker, 1, str(tmp_path), init_process_group=False,
                                            timeout_s=600)[0]
    assert static_steps["rollout"] > 10 and static_steps["eval"] > 5  # both decoded through the step
    evals = [[r for r in run if "eval_accuracy" in r] for run in (off, on)]
    assert len(evals[0]) == len(evals[1]) >= 1
    assert evals[1][-1]["eval_accuracy"] == evals[0][-1]["eval_accuracy"]
    off, on = ([r for r in run if "policy_loss" in r] for run in (off, on))
    assert len(off) == len(on) == 2
    for a, b in zip(off, on):
        assert a["response_length"] == b["response_length"] and a["reward_mean"] == b["reward_mean"]
        for key in ("policy_loss", "value_loss", "kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key
