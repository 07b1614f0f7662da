"""Issue 15's fast paths change speed, never results:

- the SDPA core attention (models/sdpa_attention.py) with log-probs scored at action positions
  only (fused log-prob + entropy pass) against today's engine (megatron's own local attention,
  every position scored): log-probs, entropy, values, PPO loss and gradients, and KV-cached
  decoding logits and greedy tokens;
- length-sorted, token-budget micro-batches trimmed to their own longest row against today's
  full-width micro-batches in batch order: same PPO loss statistics and gradients;
- the micro-batch plan never exceeds its token budget and covers every row once;
- torch's fused Adam kernel on CPU (engine.fuse_cpu_adam) against the per-tensor loop;
- oneDNN's matmuls on CPU (models/cpu_matmul.py: the output layer, models/output_projection.py,
  and every linear of the local spec) against megatron's layers on MKL: log-probs, PPO loss and
  gradients (untied and tied output weights), cached decoding;
- the no-grad linears (models/inference_linear.py), the once-per-step RoPE of decoding
  (fused_elementwise.rope_rotate / sdpa_attention._step_rotation) and the lean layer forward of generation
  (models/inference_layer.py) against megatron's, bit for bit (TP = 1 and 2; the layer at every
  layout, llama and OPT).

at TP{1,2} × PP{1,2} (one spawned job per layout; tiny llama with GQA, vocabulary 200). With
PP = 2 the token-budget plan has several shapes, so the engine runs several pipeline schedule
calls per step and must normalise the gradients once, over all of them.
"""
from __future__ import annotations

import random

import pytest
import torch

from dist_utils import run_distributed
from linear_pairs import paired_linears

TOL = 1e-5
LAYOUTS = {"tp1pp1": (1, 1, 1), "tp2pp1": (2, 1, 2), "tp1pp2": (1, 2, 2), "tp2pp2": (2, 2, 4)}
PROMPTS = [[5, 9, 14], [7, 3, 8, 22, 41, 6], [11, 12], [30, 31, 32, 33], [9, 9, 9, 9, 9], [4, 17, 2]]
RESPONSE_LENGTHS = [9, 2, 14, 5, 1, 7]  # unequal: trimming and sorting matter


# ------------------------------------------------------------------ the plan (no processes)
def test_plan_respects_token_budget_and_covers_every_row():
    from megatron_reft.data.batching import group_width, plan_micro_batches

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(max(lengths), 400)
        multiple = rng.choice([1, 8])
        groups = plan_micro_batches(lengths, 4, budget, multiple)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            width = group_width(lengths, g, multiple)
            assert len(g) * width <= budget or len(g) == 1, (lengths, budget, g)


def test_plan_hand_computed():
    from megatron_reft.data.batching import padding_fraction, plan_micro_batches

    lengths = [3, 10, 4, 9, 1]
    assert plan_micro_batches(lengths, 2) == [[1, 3], [2, 0], [4]]
    # budget 20: 10+9 share width 10 (2 × 10 = 20); 4, 3, 1 share width 4 (3 × 4 = 12 ≤ 20)
    groups = plan_micro_batches(lengths, 99, token_budget=20)
    assert groups == [[1, 3], [2, 0, 4]]
    # computed 20 + 12 = 32 positions for 27 real ones
    assert padding_fraction(lengths, groups) == pytest.approx(1 - 27 / 32)
    assert plan_micro_batches([50, 5], 8, token_budget=10) == [[0], [1]]  # an over-long row alone


# ------------------------------------------------------------------ layouts (spawned)
def _rollout():
    from megatron_reft.rl.rollout import build_rollout_batch

    g = torch.Generator().manual_seed(3)
    responses = [torch.randint(3, 200, (n,), generator=g).tolist() for n in RESPONSE_LENGTHS]
    return build_rollout_batch(PROMPTS, responses, [True] * len(PROMPTS), pad_id=0)


def _engine(attention: str, score_masked_only: bool = True):
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.models.families import model_config_from_preset

    engine = Engine(model_config_from_preset("tiny-llama", vocab_size=200), with_value_head=True,
                    attention=attention, optim=OptimSettings(lr=1e-3))
    engine.init_from_scratch(11)
    engine.score_masked_only = score_masked_only
    return engine


def _full_width(batch, size: int):
    """Today's plan: rows in batch order, every micro-batch as wide as the batch."""
    from megatron_reft.rl.rollout import split_rows

    return [split_rows(batch, range(i, min(i + size, batch.size))) for i in range(0, batch.size, size)]


def _forward(engine, batch, mbs) -> dict:
    from megatron_reft.rl.rollout import gather_forward

    outs = engine.forward(mbs)
    return {k: gather_forward(outs, k, mbs, batch) * batch.action_mask for k in ("logprobs", "entropy", "values")}


def _with_advantages(batch, forward: dict):
    from megatron_reft.rl import ppo_math

    scores = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 1.0])
    ref = forward["logprobs"] - 0.03
    rewards, _ = ppo_math.kl_penalized_rewards(scores, forward["logprobs"], ref, batch.action_mask, 0.05)
    adv, returns = ppo_math.gae_advantages(rewards, forward["values"], batch.action_mask)
    adv = ppo_math.whiten_advantages(adv, batch.action_mask)
    # old log-probs slightly off the current ones so that ratios ≠ 1 and some clip
    batch.tensors.update(old_logprobs=forward["logprobs"] + 0.5 * torch.sin(torch.arange(adv.numel()).view(adv.shape)),
                         values=forward["values"] + 0.05, advantages=adv, returns=returns)


def _loss_and_grads(engine, mbs) -> dict:
    from megatron_reft.config import load_config
    from megatron_reft.rl.trainer import ppo_loss_fn, reduce_stats

    engine.module.train()
    engine.module.zero_grad_buffer()
    stats = reduce_stats(engine.forward_backward(mbs, ppo_loss_fn(load_config(None, []))))
    grads = {n: p.main_grad.detach().clone() for n, p in engine.gpt.named_parameters()}
    return {"stats": stats, "grads": grads}


def _cached_logits(engine, tokens: torch.Tensor, prefill: int):
    """Last-position logits of a prefill and of each following one-token cached step."""
    from megatron.core.inference.contexts import StaticInferenceContext

    from megatron_reft.generation.stages import StageRunner

    engine.gpt.eval()
    stage = StageRunner(engine.gpt, engine.model_config.vocab_size)
    b, s = tokens.shape
    context = StaticInferenceContext(b, s)
    positions = torch.arange(s).expand(b, s)
    steps = [stage.last_logits(tokens[:, :prefill], positions[:, :prefill], None, context)]
    for t in range(prefill, s):
        context.sequence_len_offset = t
        context.enable_decode_mode()
        steps.append(stage.last_logits(tokens[:, t:t + 1], positions[:, t:t + 1], None, context))
    return torch.stack(steps) if stage.is_last else None


def _layout_worker(rank, world, tp, pp):
    torch.set_num_threads(1)
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.rl.rollout import micro_batches, padding_stats

    initialize(tp, pp, seed=5)
    batch = _rollout()
    rows = list(range(batch.size))
    # width_multiple 4 also under PP: several shapes, so several schedule calls per step
    old_way, budget_plan = _full_width(batch, 2), micro_batches(batch, rows, 2, token_budget=24, width_multiple=4)
    # today's engine: megatron's attention, every position scored; ours: SDPA, action positions only
    megatron, sdpa = _engine("megatron", score_masked_only=False), _engine("sdpa")
    out = {"forward": {"megatron": _forward(megatron, batch, old_way), "sdpa": _forward(sdpa, batch, old_way),
                       "sdpa_budget": _forward(sdpa, batch, budget_plan)}}
    _with_advantages(batch, out["forward"]["megatron"])
    old_way, budget_plan = _full_width(batch, 2), micro_batches(batch, rows, 2, token_budget=24, width_multiple=4)
    out["update"] = {"megatron": _loss_and_grads(megatron, old_way), "sdpa": _loss_and_grads(sdpa, old_way),
                     "sdpa_budget": _loss_and_grads(sdpa, budget_plan)}
    out["padding"] = {"old": padding_stats(batch, old_way), "budget": padding_stats(batch, budget_plan)}
    out["budget_shapes"] = [tuple(mb["tokens"].shape) for mb in budget_plan]
    out["pipeline_shapes"] = [tuple(mb["tokens"].shape) for mb in micro_batches(batch, rows, 2, token_budget=40)]
    tokens = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(4))
    out["cached"] = {"megatron": _cached_logits(megatron, tokens, 4), "sdpa": _cached_logits(sdpa, tokens, 4)}
    params = SamplingParams(max_new_tokens=6, temperature=0.0, max_total_length=20)
    out["greedy"] = {name: generate(e, PROMPTS, eos_id=1, params=params).tokens
                     for name, e in (("megatron", megatron), ("sdpa", sdpa))}
    out["greedy"]["sdpa_no_cache"] = generate(sdpa, PROMPTS, eos_id=1, params=params, use_cache=False).tokens
    # decode-slot accounting: prompts of 2–6 tokens, 6 new each. Fed a token per step, the
    # 2-token prompt's row computes 10 steps; rows of longer prompts feed prompt tokens for some
    # of them. Right-aligned, every row computes exactly its 6 steps.
    fixed = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=0.0, max_total_length=20)
    fed = generate(sdpa, PROMPTS, eos_id=1, params=fixed, align_prompts=False)
    aligned = generate(sdpa, PROMPTS, eos_id=1, params=fixed, align_prompts=True)
    out["slots"] = {name: (o.num_generated_tokens, o.decode_row_steps) for name, o in
                    (("fed", fed), ("aligned", aligned))}
    from megatron.core import parallel_state as ps

    out["last_stage"] = ps.is_pipeline_last_stage()
    shutdown()
    return out


_CACHE: dict[str, list[dict]] = {}


@pytest.fixture(scope="module")
def layout():
    def get(name):
        if name not in _CACHE:
            tp, pp, world = LAYOUTS[name]
            _CACHE[name] = run_distributed(_layout_worker, world, tp, pp, init_process_group=False, timeout_s=300)
        return _CACHE[name]

    yield get
    _CACHE.clear()


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sdpa_and_token_budget_forward_equal_megatron_attention(layout, name):
    for r in layout(name):
        f = r["forward"]
        for key in ("logprobs", "entropy", "values"):
            assert _diff(f["sdpa"][key], f["megatron"][key]) < TOL, key
            assert _diff(f["sdpa_budget"][key], f["megatron"][key]) < TOL, key


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_ppo_loss_and_grads_equal_padded_megatron_attention(layout, name):
    for r in layout(name):
        ref = r["update"]["megatron"]
        assert ref["stats"]["clip_fraction"] > 0  # the comparison exercises clipping
        # Logged statistics are means of per-micro-batch values, so they depend on the grouping;
        # with the same micro-batches they must agree. The optimised loss is a global sum over a
        # global count (engine.py), so its gradients agree under any grouping.
        for key, value in ref["stats"].items():
            assert r["update"]["sdpa"]["stats"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
        for candidate in ("sdpa", "sdpa_budget"):
            got = r["update"][candidate]
            scale = max(g.abs().max().item() for g in ref["grads"].values())
            for pname, grad in ref["grads"].items():
                assert _diff(got["grads"][pname], grad) < TOL * max(scale, 1.0), (candidate, pname)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cached_decoding_logits_and_greedy_tokens_equal(layout, name):
    ranks = layout(name)
    last = [r for r in ranks if r["last_stage"]]
    for r in last:
        assert _diff(r["cached"]["sdpa"], r["cached"]["megatron"]) < TOL
    for r in ranks:
        assert r["greedy"]["sdpa"] == r["greedy"]["megatron"] == r["greedy"]["sdpa_no_cache"]


def test_token_budget_trims_padding_and_pipeline_rounds_widths(layout):
    one = layout("tp1pp1")[0]
    assert one["padding"]["budget"]["padding_fraction"] < one["padding"]["old"]["padding_fraction"]
    assert all(b * s <= 24 for b, s in one["budget_shapes"])
    assert len(set(one["budget_shapes"])) > 1
    assert sorted(s for _, s in one["pipeline_shapes"]) == [9, 15]  # rows 15,11 | 9,8,7,5 in 40 positions
    # with PP, widths are rounded up to 16 (capped at the batch width, 15): one shape
    assert {s for _, s in layout("tp1pp2")[0]["pipeline_shapes"]} == {15}


def test_decode_slot_accounting(layout):
    slots = layout("tp1pp1")[0]["slots"]
    generated, row_steps = slots["fed"]
    assert generated == 6 * len(PROMPTS)
    # one step per slot from the shortest prompt (2) to the end of the longest (6 + 6): 10 steps;
    # rows are compacted once a quarter has finished (prompt lengths 2..6 finish at slots 8..12)
    assert generated < row_steps <= 10 * len(PROMPTS)
    assert slots["aligned"] == (generated, generated)  # every computed row-step made a token


def _module_worker(rank, world):
    """SDPA vs megatron's DotProductAttention on raw q/k/v: causal prefill, one cached decode
    token (with and without a padding mask), several tokens after a cached prefix, an explicit
    mask, query-key layer scaling."""
    torch.set_num_threads(1)
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.models.sdpa_attention import SDPADotProductAttention

    initialize(1, 1, seed=0)
    g = torch.Generator().manual_seed(0)
    diffs = {}
    for scaling in (False, True):
        config = TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                                   apply_query_key_layer_scaling=scaling, attention_softmax_in_fp32=True,
                                   attention_dropout=0.0)
        pair = [cls(config, layer_number=3, attn_mask_type=AttnMaskType.causal, attention_type="self")
                for cls in (DotProductAttention, SDPADotProductAttention)]
        # decode: one query per row, on CPU models/sdpa_attention.one_query_attention (with a
        # padding mask: right-aligned prompts, continuous batching)
        for name, sq, sk, mask in (("prefill", 7, 7, None), ("decode", 1, 7, None), ("suffix", 3, 7, "causal"),
                                   ("explicit", 5, 5, "random"), ("decode_masked", 1, 7, "random")):
            q = torch.randn(sq, 2, 4, 8, generator=g)
            k, v = torch.randn(sk, 2, 2, 8, generator=g), torch.randn(sk, 2, 2, 8, generator=g)
            if mask == "causal":  # True = not allowed, bottom-right aligned (megatron's convention)
                mask = ~torch.ones(sq, sk, dtype=torch.bool).tril(diagonal=sk - sq)[None, None]
            elif mask == "random":
                mask = torch.rand(2, 1, sq, sk, generator=g) > 0.6
                mask[..., 0] = False  # every query sees at least one key
            outs = [m(q, k, v, mask, attn_mask_type=AttnMaskType.no_mask if name.startswith("decode") else None)
                    for m in pair]
            diffs[(scaling, name)] = (outs[0] - outs[1]).abs().max().item()
    shutdown()
    return diffs


@pytest.mark.parametrize("heads,groups", [(4, 2), (4, 4), (8, 1)])
def test_one_query_attention_equals_sdpa_for_every_mask_shape(heads, groups):
    """The CPU decode path against torch's kernel with GQA: no mask, and boolean masks per row,
    per row and head, and shared by all rows (True = allowed)."""
    import torch.nn.functional as F

    from megatron_reft.models.sdpa_attention import one_query_attention

    g = torch.Generator().manual_seed(heads * 10 + groups)
    b, d, s = 3, 8, 7
    q, k, v = (torch.randn(b, n, length, d, generator=g) for n, length in ((heads, 1), (groups, s), (groups, s)))
    for shape in (None, (b, 1, 1, s), (b, heads, 1, s), (1, 1, 1, s), (1, heads, 1, s)):
        allowed = None
        if shape is not None:
            allowed = torch.rand(shape, generator=g) > 0.4
            allowed[..., -1] = True  # a row always sees its own new key
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.3, enable_gqa=True)
        assert _diff(one_query_attention(q, k, v, allowed, 0.3), expected) < 1e-6, shape


def test_sdpa_module_matches_megatron_attention_on_every_mask_kind():
    diffs = run_distributed(_module_worker, 1, init_process_group=False, timeout_s=120)[0]
    assert len(diffs) == 10
    for case, diff in diffs.items():
        assert diff < TOL, case


# ------------------------------------------------------------------ fused Adam on CPU
def _fused_adam_worker(rank, world):
    """Two engines from the same weights, one with torch's fused Adam kernel (the engine's
    default on CPU), one with the per-tensor loop megatron-core would use; three SFT-style
    steps each, plain and with the distributed optimizer."""
    torch.set_num_threads(1)
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.models.families import model_config_from_preset

    initialize(1, 1, seed=0)
    model = model_config_from_preset("tiny-llama", vocab_size=200)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200, (4, 12), generator=g)
    mb = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.ones(4, 12)}

    def loss_fn(mb, out):
        return -(out["logprobs"] * mb["loss_mask"]).sum(), int(mb["loss_mask"].sum()), {}

    result = {}
    for distributed in (False, True):
        params, flags = [], []
        for fused in (True, False):
            engine = Engine(model, optim=OptimSettings(lr=1e-2, use_distributed_optimizer=distributed))
            engine.init_from_scratch(3)
            inner = [o.optimizer for o in getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])]
            flags.append([group["fused"] for o in inner for group in o.param_groups])
            if not fused:
                for o in inner:
                    for group in o.param_groups:
                        group["fused"] = None
            start = torch.cat([p.detach().flatten() for p in engine.gpt.parameters()])
            for _ in range(3):
                engine.train_step([dict(mb)], loss_fn)
            params.append(torch.cat([p.detach().flatten() for p in engine.gpt.parameters()]))
        result[distributed] = {"flags": flags[0], "diff": (params[0] - params[1]).abs().max().item(),
                               "moved": (params[0] - start).abs().max().item()}
    shutdown()
    return result


def test_fused_cpu_adam_is_on_and_updates_as_the_per_tensor_loop():
    result = run_distributed(_fused_adam_worker, 1, init_process_group=False, timeout_s=180)[0]
    for distributed, r in result.items():
        assert r["flags"] and all(flag is True for flag in r["flags"]), (distributed, r["flags"])
        assert r["moved"] > 1e-2, (distributed, r["moved"])  # lr 1e-2, three steps: the weights moved
        assert r["diff"] < 1e-6, (distributed, r["diff"])


# ------------------------------------------------------------------ oneDNN output layer on CPU
def test_output_projection_takes_onednn_only_where_it_pays_and_matches_megatron_layer():
    """A real ColumnParallelLinear as the output layer: vocab_logits gives its logits and its
    gradients for hidden and weight wherever rows × vocabulary × hidden reach oneDNN's threshold
    (a 16,384 × 128 weight; the quickstart's 384 × 128 at 74 rows); a few rows against the small
    weight, and bf16, keep megatron's layer."""
    run_distributed(_projection_worker, 1, init_process_group=False, timeout_s=120)


def _projection_worker(rank, world):
    torch.set_num_threads(1)
    from megatron.core.tensor_parallel import ColumnParallelLinear
    from megatron.core.transformer import TransformerConfig

    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.models import cpu_matmul
    from megatron_reft.models import output_projection as op

    initialize(1, 1, seed=0)
    assert cpu_matmul.onednn_available(), "this x86 PyTorch build ships oneDNN's fp32 linear"
    config = TransformerConfig(num_layers=1, hidden_size=128, num_attention_heads=4, use_cpu_initialization=True)
    for vocab, rows, takes in ((16384, 37, True), (384, 37, True), (384, 2, False)):
        layer = ColumnParallelLinear(128, vocab, config=config, init_method=torch.nn.init.normal_, bias=False,
                                     gather_output=False)
        hidden = torch.randn(rows, 2, 128, requires_grad=True)
        assert op._takes_onednn(layer, hidden, layer.weight) is takes
        assert not op._takes_onednn(layer, hidden.bfloat16(), layer.weight.bfloat16())
        ours = op.vocab_logits(layer, hidden, None)
        theirs = layer(hidden)[0]
        assert ours.shape == theirs.shape == (rows, 2, vocab)
        assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()
        upstream = torch.randn_like(theirs)
        ours_grads = torch.autograd.grad(ours, (hidden, layer.weight), upstream)
        theirs_grads = torch.autograd.grad(theirs, (hidden, layer.weight), upstream)
        for a, b in zip(ours_grads, theirs_grads):
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()
        with torch.no_grad():  # the log-prob passes' and decoding's path
            assert torch.equal(op.vocab_logits(layer, hidden, None), ours.detach())
    shutdown()


def _onednn_engine_worker(rank, world, preset):
    """The same engine with oneDNN's matmuls (every linear and the output layer) forced on
    (threshold 0) and off:
    log-probs, entropy, values, the PPO loss and every parameter's accumulated gradient (the
    DDP hook's main_grad), cached-decoding logits and greedy tokens."""
    torch.set_num_threads(1)
    from megatron_reft.config import load_config
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine, OptimSettings
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.models import cpu_matmul
    from megatron_reft.models.families import model_config_from_preset
    from megatron_reft.rl.trainer import ppo_loss_fn, reduce_stats

    initialize(1, 1, seed=5)
    engine = Engine(model_config_from_preset(preset, vocab_size=200), with_value_head=True,
                    optim=OptimSettings(lr=1e-3))
    engine.init_from_scratch(11)
    calls = {"onednn": 0}
    kernel = cpu_matmul._onednn_linear

    def counting(hidden, weight):
        calls["onednn"] += 1
        return kernel(hidden, weight)

    cpu_matmul._onednn_linear = counting
    tokens = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(4))
    params = SamplingParams(max_new_tokens=6, temperature=0.0, max_total_length=20)
    out = {"tied": engine.gpt.share_embeddings_and_output_weights}
    for name, threshold in (("onednn", 0), ("megatron", 1 << 62)):
        cpu_matmul.ONEDNN_MIN_MACS = threshold
        before = calls["onednn"]
        batch = _rollout()
        mbs = _full_width(batch, 2)
        forward = _forward(engine, batch, mbs)
        _with_advantages(batch, forward)
        engine.module.train()
        engine.module.zero_grad_buffer()
        stats = reduce_stats(engine.forward_backward(_full_width(batch, 2), ppo_loss_fn(load_config(None, []))))
        grads = {n: p.main_grad.detach().clone() for n, p in engine.gpt.named_parameters()}
        out[name] = {"forward": forward, "stats": stats, "grads": grads,
                     "cached": _cached_logits(engine, tokens, 4),
                     "greedy": generate(engine, PROMPTS, eos_id=1, params=params).tokens,
                     "onednn_calls": calls["onednn"] - before}
    cpu_matmul._onednn_linear = kernel
    shutdown()
    return out


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt"])  # untied / tied output weight
def test_onednn_matmuls_engine_equals_megatron_layers(preset):
    out = run_distributed(_onednn_engine_worker, 1, preset, init_process_group=False, timeout_s=240)[0]
    assert out["tied"] is (preset == "tiny-opt")
    fast, slow = out["onednn"], out["megatron"]
    assert fast["onednn_calls"] > 0 and slow["onednn_calls"] == 0
    for key in ("logprobs", "entropy", "values"):
        assert _diff(fast["forward"][key], slow["forward"][key]) < TOL, key
    for key, value in slow["stats"].items():
        assert abs(fast["stats"][key] - value) < TOL * max(1.0, abs(value)), key
    for name, grad in slow["grads"].items():
        assert _diff(fast["grads"][name], grad) < TOL, name
    assert _diff(fast["cached"], slow["cached"]) < TOL
    assert fast["greedy"] == slow["greedy"]


# ------------------------------------------------- decode-step host work (the H200's gap to HF)
def _inference_linear_worker(rank, world):
    torch.set_num_threads(1)
    from megatron.core.transformer import TransformerConfig

    from megatron_reft.distributed.init import initialize, shutdown

    initialize(world, 1, seed=0)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
                               tensor_model_parallel_size=world)
    g = torch.Generator().manual_seed(rank)
    checked = 0
    for bias in (False, True):
        for skip_bias_add in (False, True):
            for theirs, ours in paired_linears(config, 16, 24, bias, skip_bias_add, g):
                x = torch.randn(5, 3, theirs.weight.shape[1], generator=g)
                with torch.no_grad():  # the lean forward: the same numbers, bit for bit
                    for got, want in zip(ours(x), theirs(x)):
                        assert (got is None) == (want is None)
                        assert want is None or torch.equal(got, want)
                x.requires_grad_(True)  # with autograd on: megatron's own forward and backward
                out_ours, out_theirs = ours(x)[0], theirs(x)[0]
                assert torch.equal(out_ours, out_theirs)
                assert torch.equal(torch.autograd.grad(out_ours.sum(), x)[0], torch.autograd.grad(out_theirs.sum(), x)[0])
                checked += 1
    shutdown()
    return checked


@pytest.mark.parametrize("world", [1, 2])
def test_inference_linears_equal_megatron_bit_for_bit(world):
    """No-grad forwards skip megatron's autograd wrappers; at TP=2 the row-parallel output is
    still all-reduced, biases and skip_bias_add behave as megatron's."""
    assert run_distributed(_inference_linear_worker, world, init_process_group=False, timeout_s=120) == [8] * world


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [8, 4])  # full and partial rotary (the rest passes through)
def test_rotate_equals_megatron_rope_bit_for_bit(dtype, rot_dim):
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from megatron_reft.models.fused_elementwise import rope_rotate
    from megatron_reft.models.sdpa_attention import _rotate_both

    g = torch.Generator().manual_seed(rot_dim)
    t = torch.randn(3, 2, 4, 8, generator=g).to(dtype)
    freqs = torch.randn(3, 1, 1, rot_dim, generator=g) * 3
    cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)
    assert torch.equal(rope_rotate(t, cos, sin), _apply_rotary_pos_emb_bshd(t, freqs))
    key = torch.randn(3, 2, 2, 8, generator=g).to(dtype)  # query and key rotated as one tensor
    query_rotated, key_rotated = _rotate_both(t, key, cos, sin)
    assert torch.equal(query_rotated, _apply_rotary_pos_emb_bshd(t, freqs))
    assert torch.equal(key_rotated, _apply_rotary_pos_emb_bshd(key, freqs))


def test_step_rotation_is_shared_within_a_step_and_never_reused_across_steps():
    """Layers of one step share one (cos, sin); a new offset, new per-row positions (even with
    the same values' shape) or a new angle table recompute it."""
    from types import SimpleNamespace

    from megatron_reft.models.sdpa_attention import rope_cached_self_attention

    attention = SimpleNamespace(config=SimpleNamespace(rotary_scaling_factor=None, mscale=None,
                                                       position_embedding_type="rope"))
    step_rotation = rope_cached_self_attention()._step_rotation.__get__(attention)
    table = torch.randn(10, 1, 1, 6)
    context = SimpleNamespace(row_positions=None)

    def fresh(freqs):
        return torch.cos(freqs), torch.sin(freqs)

    first = step_rotation(context, table, 3, 1, torch.float32)
    assert step_rotation(context, table, 3, 1, torch.float32) is first  # the step's other layers
    for got, want in zip(first, fresh(table[3:4])):
        assert torch.equal(got, want)
    moved = step_rotation(context, table, 4, 1, torch.float32)  # next step
    assert torch.equal(moved[0], fresh(table[4:5])[0])
    prefill = step_rotation(context, table, 0, 5, torch.float32)
    assert torch.equal(prefill[1], fresh(table[0:5])[1])
    for rows in (torch.tensor([2, 7]), torch.tensor([5, 1])):  # per-row positions, a new tensor per step
        context.row_positions = rows
        got = step_rotation(context, table, 4, 1, torch.float32)
        assert torch.equal(got[0], fresh(table[rows].transpose(0, 1))[0])
    other_table = table + 1.0
    context.row_positions = None
    assert torch.equal(step_rotation(context, other_table, 4, 1, torch.float32)[0], fresh(other_table[4:5])[0])


def _lean_layer_worker(rank, world, tp, pp):
    """The same engine with the lean layer forward on and off (`_reft_lean`, the per-layer switch
    `inference_layer._lean_layer` caches): cached prefill + decode logits, sampled tokens with
    their log-probs and values, continuous batching (per-row RoPE positions, padding masks)."""
    torch.set_num_threads(1)
    import megatron_reft.models.inference_layer as inference_layer
    from megatron_reft.distributed.init import initialize, shutdown
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate
    from megatron_reft.models.families import model_config_from_preset

    initialize(tp, pp, seed=5)
    calls = [0]
    lean_attention = inference_layer._attention

    def counted(*args):
        calls[0] += 1
        return lean_attention(*args)

    inference_layer._attention = counted
    tokens = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(4))
    sample = SamplingParams(max_new_tokens=7, max_total_length=20)
    out = {}
    for preset in ("tiny-llama", "tiny-opt"):  # RoPE + GQA + SwiGLU; learned positions + biases + GELU
        engine = Engine(model_config_from_preset(preset, vocab_size=200), with_value_head=True)
        engine.init_from_scratch(11)
        _nonzero_biases(engine.gpt)
        layers = engine.gpt.decoder.layers
        assert all(isinstance(layer, inference_layer.InferenceTransformerLayer) for layer in layers)
        # llama twice: RoPE applied as keys enter the cache (the fast path), and megatron's own
        # RoPE calls (`_plain_rope` off, as with fused or interleaved RoPE): the query is then
        # rotated in the layer's forward
        for rope in ("cached", "megatron") if preset == "tiny-llama" else ("none",):
            for layer in layers if rope == "megatron" else ():
                layer.self_attention._plain_rope = lambda: False
            for lean in (True, False):
                for layer in layers:
                    layer._reft_lean = lean
                calls[0] = 0
                sampled = generate(engine, PROMPTS, eos_id=1, params=sample, seed=3, return_logprobs=True)
                continuous = generate(engine, PROMPTS, eos_id=1, params=sample, seed=3, slots=4)
                out[(preset, rope, lean)] = {"cached": _cached_logits(engine, tokens, 4), "tokens": sampled.tokens,
                                             "logprobs": sampled.logprobs, "values": sampled.values,
                                             "continuous": continuous.tokens, "lean_calls": calls[0]}
    shutdown()
    return out


def _nonzero_biases(gpt) -> None:
    """Biases start at zero; give them values (the same on every rank that holds a copy: seeded
    by name) so that the order of the bias and residual additions is visible."""
    import zlib

    with torch.no_grad():
        for pname, param in gpt.named_parameters():
            if pname.endswith("bias"):
                g = torch.Generator().manual_seed(zlib.crc32(pname.encode()))
                param.add_(torch.randn(param.shape, generator=g) * 0.1)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_lean_layer_forward_equals_megatron_layer_bit_for_bit(name):
    """models/inference_layer.py: generation through the lean layer forward gives megatron's
    layer's numbers exactly (same ops, same order), on every layout and both families."""
    tp, pp, world = LAYOUTS[name]
    for r in run_distributed(_lean_layer_worker, world, tp, pp, init_process_group=False, timeout_s=300):
        for preset, rope in (("tiny-llama", "cached"), ("tiny-llama", "megatron"), ("tiny-opt", "none")):
            lean, megatron = r[(preset, rope, True)], r[(preset, rope, False)]
            assert lean["lean_calls"] > 0 and megatron["lean_calls"] == 0  # each path was taken
            assert (lean["cached"] is None) == (megatron["cached"] is None)
            if lean["cached"] is not None:
                assert torch.equal(lean["cached"], megatron["cached"]), (preset, rope)
            for key in ("tokens", "continuous", "logprobs", "values"):
                assert lean[key] == megatron[key], (preset, rope, key)
