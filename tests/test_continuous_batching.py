"""Continuous batching in the rollout engine (generation/continuous.py): waiting prompts admitted
into finished rows give the same greedy tokens as today's static engine, at TP1 and TP2×PP2
(llama, RoPE) and PP2 (OPT, learned positions); the cache shift is exercised (schedules longer
than the cache); slot accounting hand-computed; seeded sampling reproducible.

Megatron runs in spawned processes (tests/dist_utils.py); each worker returns plain lists.
"""
import pytest
import torch

from dist_utils import run_distributed
from megatron_reft.generation.sampling import SamplingParams

VOCAB = 500
PROMPT_LENGTHS = (5, 9, 1, 12, 3, 7, 2, 8, 4, 6, 10, 3)
CAPS = (3, 10, 6, 1, 9, 4, 12, 2, 7, 5, 8, 11)  # unequal response lengths (ignore_eos)
GREEDY = SamplingParams(max_new_tokens=12, greedy=True, ignore_eos=True, max_total_length=40)


def _engine(family):
    from megatron_reft.engine import Engine
    from megatron_reft.models.families import model_config_from_preset

    # init_std 0.2: peaked logits, so greedy choices are not decided by rounding noise
    engine = Engine(model_config_from_preset(f"tiny-{family}", vocab_size=VOCAB, init_std=0.2))
    engine.init_from_scratch(seed=7)
    return engine


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _suite(engine) -> dict:
    from megatron_reft.generation import generate

    prompts, caps = _prompts(), list(CAPS)
    run = lambda params, **kw: generate(engine, prompts, VOCAB - 1, params, response_caps=caps, **kw)
    static = run(GREEDY)
    out = {"static": static.tokens, "static_occupancy": static.slot_occupancy}
    for slots in (1, 3, 5):
        o = run(GREEDY, slots=slots)
        out[slots] = {"tokens": o.tokens, "steps": o.decode_slot_steps // slots,
                      "occupancy": o.slot_occupancy, "generated": o.num_generated_tokens}
    eos = static.tokens[1][2]  # stop at a token prompt 1 emits third
    stop = SamplingParams(max_new_tokens=12, greedy=True, max_total_length=16)
    a, b = generate(engine, prompts, eos, stop), generate(engine, prompts, eos, stop, slots=4)
    out["eos"] = (a.tokens, a.finished, b.tokens, b.finished)
    sample = SamplingParams(max_new_tokens=12, max_total_length=40)
    out["sampled"] = [run(sample, seed=s, slots=4).tokens for s in (3, 3, 4)]
    return out


def _worker(rank, world, tp, pp, families):
    from megatron_reft.distributed import init as dinit

    torch.set_num_threads(1)
    dinit.initialize(tp, pp, seed=1)
    result = {family: _suite(_engine(family)) for family in families}
    result["hand"] = _hand_counted() if world == 1 else None
    dinit.shutdown()
    return result


def _hand_counted():
    """Prompts of 2 tokens, responses of 1, 3, 2 tokens, 2 slots: step 1 decodes A and B (A ends),
    C takes A's row; step 2 decodes B and C; step 3 decodes B (ends) and C (ends). 3 steps,
    6 rows computed, 6 slot-steps, 6 tokens. Static engine, one batch of 3: 3 steps of 3 rows,
    compacted to 2 rows after step 1 (1 of 3 done < 75 %)... then 1 after step 2: 3 + 2 + 1."""
    from megatron_reft.generation import generate

    engine = _engine("llama")
    prompts = [[5, 6], [7, 8], [9, 10]]
    params = SamplingParams(max_new_tokens=3, greedy=True, ignore_eos=True)
    cont = generate(engine, prompts, 0, params, slots=2, response_caps=[1, 3, 2])
    static = generate(engine, prompts, 0, params, response_caps=[1, 3, 2])
    return {"continuous": (cont.num_generated_tokens, cont.decode_row_steps, cont.decode_slot_steps),
            "static": (static.num_generated_tokens, static.decode_row_steps, static.decode_slot_steps),
            "same": cont.tokens == static.tokens}


@pytest.fixture(scope="module")
def single():
    return run_distributed(_worker, 1, 1, 1, ("llama", "opt"), init_process_group=False, timeout_s=240)[0]


@pytest.fixture(scope="module", params=[(2, 2, "llama"), (1, 2, "opt")], ids=["tp2pp2-llama", "pp2-opt"])
def parallel(request):
    tp, pp, family = request.param
    return family, run_distributed(_worker, tp * pp, tp, pp, (family,), init_process_group=False, timeout_s=300)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_continuous_greedy_equals_static_engine(single, family):
    r = single[family]
    assert [len(t) for t in r["static"]] == list(CAPS)
    for slots in (1, 3, 5):
        assert r[slots]["tokens"] == r["static"], f"slots={slots}"
        assert r[slots]["generated"] == sum(CAPS)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_schedule_outlives_the_cache_so_rows_are_shifted(single, family):
    # The cache holds 2 × the longest prompt + response (2 × 21 slots); one slot decodes all 12
    # sequences back to back (> 60 steps), so the cache shift ran and tokens stayed equal.
    r = single[family]
    longest = max(n + c for n, c in zip(PROMPT_LENGTHS, CAPS))
    assert r[1]["steps"] > 2 * longest
    assert r[1]["tokens"] == r["static"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_eos_stops_equal_static_engine(single, family):
    tokens, finished, cont_tokens, cont_finished = single[family]["eos"]
    assert any(finished) and not all(finished)
    assert cont_tokens == tokens and cont_finished == finished


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_seeded_sampling_reproducible(single, family):
    same, again, other = single[family]["sampled"]
    assert same == again
    assert same != other


def test_slot_accounting_hand_counted(single):
    h = single["hand"]
    assert h["continuous"] == (6, 6, 6)
    assert h["static"] == (6, 3 + 2 + 1, 9)
    assert h["same"]


def test_continuous_keeps_slots_busier_than_static(single):
    r = single["llama"]
    assert r[3]["occupancy"] > r["static_occupancy"]


def test_parallel_layouts_equal_single_process(single, parallel):
    family, ranks = parallel
    for rank in ranks:
        r = rank[family]
        for slots in (1, 3, 5):
            assert r[slots]["tokens"] == single[family]["static"]
        assert r["eos"] == single[family]["eos"]
        assert r["sampled"][0] == r["sampled"][1]


def test_bad_arguments_rejected():
    from megatron_reft.generation.generate import response_limits

    with pytest.raises(ValueError, match="response caps"):
        response_limits([[1, 2]], GREEDY, caps=[1, 2])
    with pytest.raises(ValueError, match="cap 0"):
        response_limits([[1, 2]], GREEDY, caps=[0])


def _ppo_worker(rank, world, out_dir):
    from pathlib import Path

    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import shutdown
    from megatron_reft.rl.trainer import PPOTrainer

    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    config = load_config(str(repo / "configs" / "tiny_cpu.yaml"), [
        f"trainer.output_dir={out_dir}", "trainer.max_steps=1", "trainer.eval_interval=1000",
        "trainer.progress_bar=false", "trainer.tensorboard=false", "data.synthetic_train_items=16",
        "data.synthetic_eval_items=4", "ppo.rollout_batch_size=6", "trainer.micro_batch_size=2",
        "data.max_total_length=48", "ppo.generation_micro_batch=2", "ppo.continuous_batching=true"])
    trainer = PPOTrainer(config)
    trainer.train()
    records, texts = trainer.last_rollout
    shutdown()
    return len(texts)


def test_ppo_step_with_continuous_batching(tmp_path):
    # 6 rollouts through 2 decode slots: the trainer's one-queue path end to end.
    assert run_distributed(_ppo_worker, 1, str(tmp_path), init_process_group=False, timeout_s=300)[0] == 6
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def _align_worker(rank, world, out_dir):
    """One greedy PPO step per ppo.align_prompts setting: the same rollouts, decode utilisation
    in the metrics."""
    import json
    from pathlib import Path

    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import shutdown
    from megatron_reft.rl.trainer import PPOTrainer

    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    out = {}
    for align in ("true", "false"):
        config = load_config(str(repo / "configs" / "tiny_cpu.yaml"), [
            f"trainer.output_dir={out_dir}/{align}", "trainer.max_steps=1", "trainer.eval_interval=1000",
            "trainer.progress_bar=false", "trainer.tensorboard=false", "data.synthetic_train_items=16",
            "data.synthetic_eval_items=4", "ppo.rollout_batch_size=6", "trainer.micro_batch_size=2",
            "data.max_total_length=48", "ppo.temperature=0", f"ppo.align_prompts={align}"])
        trainer = PPOTrainer(config)
        trainer.train()
        spread = max(map(len, trainer.prompts)) - min(map(len, trainer.prompts))
        shutdown()
        metrics = json.loads((Path(out_dir) / align / "metrics.jsonl").read_text().splitlines()[0])
        out[align] = (trainer.last_rollout[1], metrics["decode_utilisation"], spread)
    return out


def test_ppo_align_prompts_keeps_greedy_rollouts_and_raises_decode_utilisation(tmp_path):
    r = run_distributed(_align_worker, 1, str(tmp_path), init_process_group=False, timeout_s=300)[0]
    (aligned_texts, aligned_use, spread), (fed_texts, fed_use, _) = r["true"], r["false"]
    assert spread > 0  # ragged prompts: the two schemes differ
    assert aligned_texts == fed_texts
    assert 0 < fed_use < aligned_use <= 1


def _refused_worker(rank, world, out_dir):
    from pathlib import Path

    from megatron_reft.config import ConfigError, load_config
    from megatron_reft.distributed.init import shutdown
    from megatron_reft.rl.trainer import PPOTrainer

    from megatron_reft.rl import trainer as trainer_module

    repo = Path(__file__).resolve().parents[1]
    config = load_config(str(repo / "configs" / "tiny_cpu.yaml"), [
        f"trainer.output_dir={out_dir}", "trainer.tensorboard=false",
        "ppo.generation_micro_batch=2", "ppo.continuous_batching=true"])
    # Transformer Engine's attention (not importable here) is the one that cannot mask while
    # decoding; tests/test_generation.py checks that masks_while_decoding detects such a module.
    trainer_module.masks_while_decoding = lambda gpt: False
    try:
        PPOTrainer(config)
        return None
    except ConfigError as err:
        return str(err)
    finally:
        shutdown()


def test_continuous_batching_is_refused_where_attention_cannot_mask_while_decoding(tmp_path):
    # Transformer Engine's attention follows the mask type, which megatron switches to no_mask past
    # the prefill: admitted rows would see their predecessors' cache. A clear error before any step.
    message = run_distributed(_refused_worker, 1, str(tmp_path), init_process_group=False, timeout_s=300)[0]
    assert message is not None and message.startswith("ppo.continuous_batching:")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_plan_counts_the_doubled_cache():
    from megatron_reft.config import load_config
    from megatron_reft.models.families import model_config_from_preset
    from megatron_reft.planning import make_plan

    model = model_config_from_preset("tiny-llama")
    kv = {}
    for flag in ("false", "true"):
        config = load_config(None, ["ppo.rollout_batch_size=8", "ppo.generation_micro_batch=2",
                                    f"ppo.continuous_batching={flag}"])
        items = make_plan(config, model, "ppo", 1).phases["rollout"]
        kv[flag] = next(i for i in items if i.name == "KV cache")
    assert kv["true"].bytes == 2 * kv["false"].bytes
