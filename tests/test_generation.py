"""Rollout engine (megatron_reft/generation): KV-cached generation against no-cache recomputation
and a naive one-prompt-at-a-time argmax loop, under TP=2, PP=2 and TP=2×PP=2; batching, EOS,
length limits, padded vocabulary, top-k/top-p, seeded sampling; ragged prompts right-aligned
against fed a token per step.

Megatron runs in spawned processes (tests/dist_utils.py): its parallel state and the CPU
compatibility layer are process-global. Each worker returns plain token lists; the assertions
run here. Tiny models with vocab_size=500, padded to 512 (the padding is sampled if it leaks).
"""
import pytest
import torch

from dist_utils import run_distributed
from megatron_reft.generation.sampling import (SamplingParams, next_tokens, sample_from, top_k_filter,
                                               top_p_filter)
from megatron_reft.generation.generate import response_limits

VOCAB = 500
PROMPT_LENGTHS = (5, 9, 1, 12, 3)
NEW = 10


def _model_config(family):
    from megatron_reft.models.families import model_config_from_preset

    # init_std 0.2: peaked logits, so greedy choices are not decided by rounding noise
    # (the TP/PP runs are compared with a single-process reference).
    return model_config_from_preset(f"tiny-{family}", vocab_size=VOCAB, init_std=0.2)


def _prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB - 1, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _engine(family):
    from megatron_reft.engine import Engine

    engine = Engine(_model_config(family))
    engine.init_from_scratch(seed=7)
    return engine


def _naive_greedy(engine, prompt, new_tokens):
    """Reference: one prompt, whole sequence recomputed each step, argmax over the true vocab."""
    from megatron_reft.engine import causal_mask

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            x = torch.tensor([ids])
            logits = engine.gpt(x, torch.arange(x.shape[1])[None], causal_mask(x.shape[1]))
            ids.append(int(logits[0, -1, :VOCAB].argmax()))
    return ids[len(prompt):]


def _generate_suite(engine, eos_id=VOCAB - 1):
    """The same calls on every layout: greedy with/without cache, sampled, reproducibility."""
    from megatron_reft.generation import generate

    prompts = _prompts()
    greedy = SamplingParams(max_new_tokens=NEW, greedy=True)
    sample = SamplingParams(max_new_tokens=NEW)
    run = lambda params, **kw: generate(engine, prompts, eos_id, params, **kw)
    # Total length 14 ends the sequences at different steps: the batch is compacted mid-way.
    limited = SamplingParams(max_new_tokens=NEW, greedy=True, max_total_length=14)
    swaps = _count_cache_swaps()
    limited_tokens = run(limited).tokens
    aligned, fed = run(greedy), run(greedy, align_prompts=False)
    return {
        "fed": fed.tokens,
        "aligned_steps": aligned.decode_slot_steps // len(prompts),
        "fed_steps": fed.decode_slot_steps // len(prompts),
        "limited": limited_tokens,
        "limited_compactions": len(swaps),
        "limited_no_cache": run(limited, use_cache=False).tokens,
        "cache": run(greedy).tokens,
        "no_cache": run(greedy, use_cache=False).tokens,
        "sampled": run(sample, seed=11).tokens,
        "sampled_again": run(sample, seed=11).tokens,
        "sampled_no_cache": run(sample, seed=11, use_cache=False).tokens,
        "sampled_other_seed": run(sample, seed=12).tokens,
    }


def _count_cache_swaps() -> list:
    """Record every KV-cache row reordering (batch compaction) from now on."""
    import importlib

    engine_module = importlib.import_module("megatron_reft.generation.generate")  # the module, not the function

    calls = []
    original = getattr(engine_module.move_cache_rows_to_front, "original", engine_module.move_cache_rows_to_front)

    def counting(context, rows, filled):
        calls.append(len(rows))
        return original(context, rows, filled)

    counting.original = original
    engine_module.move_cache_rows_to_front = counting
    return calls


def _limited_expectation(naive):
    return [seq[:min(NEW, 14 - n)] for seq, n in zip(naive, PROMPT_LENGTHS)]


# ---------------------------------------------------------------- workers (spawned processes)
def _single_process_worker(rank, world_size):
    from megatron_reft.distributed import init as dinit
    from megatron_reft.generation import generate

    torch.set_num_threads(1)  # tiny matmuls: extra threads only contend (2 cores, several ranks)
    dinit.initialize(1, 1, seed=1)
    results = {}
    for family in ("llama", "opt"):
        engine = _engine(family)
        prompts = _prompts()
        r = _generate_suite(engine)
        r["naive"] = [_naive_greedy(engine, p, NEW) for p in prompts]
        greedy = SamplingParams(max_new_tokens=NEW, greedy=True)
        r["alone"] = [generate(engine, [p], VOCAB - 1, greedy).tokens[0] for p in prompts]
        r["top_k_1"] = generate(engine, prompts, VOCAB - 1, SamplingParams(max_new_tokens=NEW, top_k=1), seed=5).tokens
        r["top_p_tiny"] = generate(engine, prompts, VOCAB - 1,
                                   SamplingParams(max_new_tokens=NEW, top_p=1e-6), seed=5).tokens
        r["eos"] = _eos_runs(engine, prompts, r["cache"])
        r["limits"] = _limit_runs(engine)
        r["training_flag_kept"] = engine.gpt.training
        r["output_layer_rows"], r["generated_tokens"] = _output_layer_rows(engine, prompts)
        r["megatron_attention"] = _megatron_attention_runs(family, prompts)
        results[family] = r
    results["padded_vocab"] = _padded_vocab_runs()
    results["diverged"] = _diverged_runs(_engine("llama"))
    dinit.shutdown()
    return results


def _output_layer_rows(engine, prompts) -> tuple[int, int]:
    """Rows the output layer computed in one sampled generation (ragged prompts, EOS stops),
    and the tokens it generated."""
    from megatron_reft.generation import generate

    rows = []
    hook = engine.gpt.output_layer.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[1]))
    try:
        out = generate(engine, prompts, 7, SamplingParams(max_new_tokens=NEW), seed=3)
    finally:
        hook.remove()
    return sum(rows), out.num_generated_tokens


def _megatron_attention_runs(family, prompts) -> dict:
    """megatron's own local attention (the `model.attention: megatron` spec) applies a given mask
    while decoding too: right-aligned prompts and continuous batching run on it. An attention that
    does not (Transformer Engine's, not importable here; a stand-in module class) is detected."""
    from megatron_reft.engine import Engine
    from megatron_reft.generation import generate
    from megatron_reft.generation.stages import masks_while_decoding

    engine = Engine(_model_config(family), attention="megatron")
    engine.init_from_scratch(seed=7)
    greedy = SamplingParams(max_new_tokens=NEW, greedy=True)
    out = generate(engine, prompts, VOCAB - 1, greedy)
    continuous = generate(engine, prompts, VOCAB - 1, greedy, slots=2)
    layer = engine.gpt.decoder.layers[0].self_attention
    sdpa_masks, megatron_masks = masks_while_decoding(_engine(family).gpt), masks_while_decoding(engine.gpt)
    layer.core_attention = torch.nn.Identity()  # a core attention of another kind, as TE's is
    return {"tokens": out.tokens, "steps": out.decode_slot_steps // len(prompts), "continuous": continuous.tokens,
            "masks": (sdpa_masks, megatron_masks, masks_while_decoding(engine.gpt))}


def _eos_runs(engine, prompts, unstopped):
    """EOS = the 3rd greedy token of prompt 1; greedy with stopping (cache and no cache)."""
    from megatron_reft.generation import generate

    eos = unstopped[1][2]
    params = SamplingParams(max_new_tokens=NEW, greedy=True)
    out = {"eos": eos}
    for use_cache in (True, False):
        o = generate(engine, prompts, eos, params, use_cache=use_cache)
        out[use_cache] = (o.tokens, o.finished, o.num_generated_tokens)
    ignored = generate(engine, prompts, eos, SamplingParams(max_new_tokens=NEW, greedy=True, ignore_eos=True))
    out["ignore_eos"] = (ignored.tokens, ignored.finished)
    return out


def _limit_runs(engine):
    """Prompts near max_total_length: prompt + response must stay ≤ it."""
    from megatron_reft.generation import generate

    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (3, 9, 14, 19)]
    params = SamplingParams(max_new_tokens=15, max_total_length=20, ignore_eos=True)
    out = generate(engine, prompts, VOCAB - 1, params, seed=0)
    return {"prompt_lengths": [len(p) for p in prompts], "tokens": out.tokens, "finished": out.finished,
            "num": out.num_generated_tokens}


def _padded_vocab_runs():
    """OPT (tied embeddings, final LayerNorm with bias) rigged so that the PADDED vocabulary rows
    win every argmax by far: generation must still only produce real tokens."""
    from megatron_reft.engine import causal_mask
    from megatron_reft.generation import generate

    engine = _engine("opt")
    gpt = engine.gpt
    with torch.no_grad():
        gpt.decoder.final_layernorm.bias[0] = 50.0
        gpt.embedding.word_embeddings.weight[VOCAB:, 0] = 50.0
        x = torch.tensor([_prompts()[0]])
        full_logits = gpt(x, torch.arange(x.shape[1])[None], causal_mask(x.shape[1]))
    prompts = _prompts()
    return {
        "padded_size": gpt.embedding.word_embeddings.weight.shape[0],
        "unmasked_argmax": int(full_logits[0, -1].argmax()),
        "greedy": generate(engine, prompts, 0, SamplingParams(max_new_tokens=NEW, greedy=True)).tokens,
        "sampled": generate(engine, prompts, 0, SamplingParams(max_new_tokens=NEW), seed=3).tokens,
    }


def _diverged_runs(engine) -> dict:
    """A policy whose weights went NaN (the last stage's final norm): each way of decoding must
    stop with the one-line NonFiniteError on every rank, not draw tokens from garbage."""
    from megatron_reft.generation import generate
    from megatron_reft.reliability import NonFiniteError

    norm = getattr(engine.gpt.decoder, "final_layernorm", None)
    if norm is not None:  # the last pipeline stage
        with torch.no_grad():
            norm.weight.fill_(float("nan"))
    errors = {}
    for name, params, kwargs in (("sampled", SamplingParams(max_new_tokens=NEW), {"seed": 3}),
                                 ("greedy", SamplingParams(max_new_tokens=NEW, greedy=True), {}),
                                 ("scored", SamplingParams(max_new_tokens=NEW), {"seed": 3, "return_logprobs": True})):
        try:
            generate(engine, _prompts(), VOCAB - 1, params, **kwargs)
            errors[name] = None
        except NonFiniteError as err:
            errors[name] = str(err)
    return errors


def _parallel_worker(rank, world_size, tp, pp, family):
    from megatron.core import parallel_state as ps
    from megatron_reft.distributed import init as dinit

    torch.set_num_threads(1)
    dinit.initialize(tp, pp, seed=1)
    engine = _engine(family)
    result = _generate_suite(engine)
    result["diverged"] = _diverged_runs(engine)
    result["tp_rank"] = ps.get_tensor_model_parallel_rank()
    result["pp_rank"] = ps.get_pipeline_model_parallel_rank()
    dinit.shutdown()
    return result


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def single():
    return run_distributed(_single_process_worker, 1, init_process_group=False, timeout_s=240)[0]


@pytest.fixture(scope="module", params=[(2, 1, "llama"), (1, 2, "opt"), (2, 2, "llama")],
                ids=["tp2-llama", "pp2-opt", "tp2pp2-llama"])
def parallel(request):
    tp, pp, family = request.param
    ranks = run_distributed(_parallel_worker, tp * pp, tp, pp, family, init_process_group=False,
                            timeout_s=240)
    return family, tp, pp, ranks


# ---------------------------------------------------------------- single process
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_kv_cache_greedy_equals_recomputation_and_naive_loop(single, family):
    r = single[family]
    assert [len(t) for t in r["cache"]] == [NEW] * len(PROMPT_LENGTHS)
    assert r["cache"] == r["no_cache"]
    assert r["cache"] == r["naive"]


FED_STEPS = max(PROMPT_LENGTHS) + NEW - min(PROMPT_LENGTHS)  # the longest prompt's extra tokens fed one a step


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_right_aligned_prompts_decode_in_fewer_steps_and_give_the_fed_tokens(single, family):
    """Ragged prompts (1 to 12 tokens) are prefilled right-aligned: NEW decode steps instead of
    FED_STEPS, the same greedy tokens as feeding them a token per step (and as the naive loop)."""
    r = single[family]
    assert r["aligned_steps"] == NEW < r["fed_steps"] == FED_STEPS
    assert r["fed"] == r["cache"] == r["naive"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_megatron_attention_masks_while_decoding_too(single, family):
    r = single[family]["megatron_attention"]
    assert r["steps"] == NEW
    assert r["tokens"] == r["continuous"] == single[family]["naive"]
    assert r["masks"] == (True, True, False)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_batched_prompts_of_different_lengths_equal_each_prompt_alone(single, family):
    assert single[family]["cache"] == single[family]["alone"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_output_layer_runs_only_for_rows_that_choose_a_token(single, family):
    """Rows still feeding their prompt (ragged prompts) or finished skip the vocabulary
    projection: one output-layer row per generated token, no more."""
    r = single[family]
    assert r["output_layer_rows"] == r["generated_tokens"] > 0


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_top_k_1_and_tiny_top_p_equal_greedy(single, family):
    r = single[family]
    assert r["top_k_1"] == r["cache"]
    assert r["top_p_tiny"] == r["cache"]


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_seeded_sampling_is_reproducible(single, family):
    r = single[family]
    assert r["sampled"] == r["sampled_again"] == r["sampled_no_cache"]
    assert r["sampled"] != r["sampled_other_seed"]
    assert r["sampled"] != r["cache"]  # T=1 sampling is not greedy


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_stops_each_sequence_at_its_first_eos(single, family):
    r = single[family]["eos"]
    eos, (unstopped, _) = r["eos"], r["ignore_eos"]
    assert unstopped == single[family]["cache"]  # ignore_eos: nothing stops
    expected = [seq[:seq.index(eos) + 1] if eos in seq else seq for seq in unstopped]
    expected_finished = [eos in seq for seq in unstopped]
    assert any(expected_finished) and not all(expected_finished), "test needs a mix"
    for use_cache in (True, False):
        tokens, finished, count = r[use_cache]
        assert tokens == expected
        assert finished == expected_finished
        assert count == sum(map(len, expected))
    assert not any(r["ignore_eos"][1])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_sequences_cut_at_different_steps_keep_their_tokens_through_compaction(single, family):
    r = single[family]
    assert r["limited_compactions"] >= 1  # the batch really was compacted
    assert r["limited"] == r["limited_no_cache"] == _limited_expectation(r["naive"])


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_length_limits(single, family):
    r = single[family]["limits"]
    expected = [min(15, 20 - n) for n in r["prompt_lengths"]]  # [15, 11, 6, 1]
    assert [len(t) for t in r["tokens"]] == expected
    assert all(n + len(t) <= 20 for n, t in zip(r["prompt_lengths"], r["tokens"]))
    assert r["finished"] == [False] * 4 and r["num"] == sum(expected)


def test_padded_vocabulary_is_never_sampled(single):
    r = single["padded_vocab"]
    assert r["padded_size"] > VOCAB
    assert r["unmasked_argmax"] >= VOCAB, "rigging failed: padding would not be tempting"
    for key in ("greedy", "sampled"):
        assert all(0 <= t < VOCAB for seq in r[key] for t in seq)


def test_a_diverged_policy_stops_generation_with_a_clear_error(single):
    for name, message in single["diverged"].items():
        assert message is not None, f"{name}: generated from NaN logits"
        assert "not finite" in message and "position" in message, message


def test_engine_training_mode_is_restored(single):
    assert single["llama"]["training_flag_kept"] is True


# ---------------------------------------------------------------- TP / PP
def test_parallel_generation_matches_single_process_and_agrees_across_ranks(single, parallel):
    family, tp, pp, ranks = parallel
    assert sorted((r["tp_rank"], r["pp_rank"]) for r in ranks) == [(t, p) for t in range(tp) for p in range(pp)]
    reference = single[family]
    for r in ranks:
        # every rank (all TP and PP ranks) returns the same tokens
        for key in ("cache", "no_cache", "sampled", "sampled_again", "sampled_no_cache"):
            assert r[key] == ranks[0][key], (key, r["tp_rank"], r["pp_rank"])
        assert r["cache"] == r["no_cache"] == r["fed"]
        assert r["aligned_steps"] == NEW and r["fed_steps"] == FED_STEPS
        assert r["sampled"] == r["sampled_again"] == r["sampled_no_cache"]
        assert r["cache"] == reference["naive"]
        assert r["limited"] == r["limited_no_cache"] == _limited_expectation(reference["naive"])
        assert r["limited_compactions"] >= 1
        assert all(t < VOCAB for seq in r["sampled"] for t in seq)
        # NaN weights on the last stage only: every rank (including the first stage's, which
        # never sees a logit) stops with the error, none waits forever on the next step
        assert all(message and "not finite" in message for message in r["diverged"].values()), r["diverged"]


# ---------------------------------------------------------------- pure functions
def test_top_k_filter_keeps_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]
    assert top_k_filter(logits, 0).isfinite().all()


def test_top_p_filter_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    assert top_p_filter(logits, 0.5).isfinite().tolist() == [[True, False, False, False]]
    assert top_p_filter(logits, 0.79).isfinite().tolist() == [[True, False, True, False]]
    assert top_p_filter(logits, 0.81).isfinite().tolist() == [[True, False, True, True]]
    assert top_p_filter(logits, 1.0).isfinite().all()


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(20000, 4)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(next_tokens(logits, SamplingParams(top_k=2), g), minlength=4).float()
    expected = torch.tensor([1.0, torch.e ** -1, 0, 0])
    assert torch.allclose(counts / counts.sum(), expected / expected.sum(), atol=0.02)
    hot = next_tokens(logits, SamplingParams(temperature=0.05), g)
    assert (hot == 0).all()


def test_inverse_transform_sampling_never_picks_zero_probability_tokens():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0]]).repeat(2000, 1)
    draws = sample_from(probs, g).view(2000, 3)
    assert set(draws[:, 0].tolist()) == {1, 3} and abs((draws[:, 0] == 1).float().mean() - 0.5) < 0.03
    assert (draws[:, 1] == 0).all() and (draws[:, 2] == 4).all()
    again = sample_from(probs, torch.Generator().manual_seed(0)).view(2000, 3)
    assert torch.equal(draws, again)


def _flat_inverse_cdf(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The textbook sampler: the first token whose float64 cumulative weight exceeds u × total."""
    cdf = weights.double().cumsum(dim=-1)
    u = torch.rand((weights.shape[0], 1), generator=generator, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def test_two_level_sampler_draws_what_the_flat_inverse_cdf_draws():
    # A 32k vocabulary takes the blocked path (its length not a multiple of the block); a peaked,
    # a flat and a sparse row (mass only in the last, padded block and in one middle token).
    vocab = 32016
    weights = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1)).mul(4).softmax(-1)
    weights[1] = 1.0
    weights[2] = 0.0
    weights[2, [7, vocab - 1]] = torch.tensor([1e-3, 1.0])
    for seed in range(50):
        ours = sample_from(weights, torch.Generator().manual_seed(seed))
        assert torch.equal(ours, _flat_inverse_cdf(weights, torch.Generator().manual_seed(seed)))
        assert bool((weights.gather(1, ours[:, None]) > 0).all())


def test_two_level_sampler_never_draws_zero_weight_and_keeps_the_frequencies():
    g = torch.Generator().manual_seed(0)
    weights = torch.zeros(4000, 5000)
    weights[:, [0, 255, 256, 4999]] = torch.tensor([1.0, 2.0, 3.0, 4.0])  # block edges
    draws = sample_from(weights, g)
    freq = torch.bincount(draws, minlength=5000)[[0, 255, 256, 4999]].float() / 4000
    assert set(draws.tolist()) <= {0, 255, 256, 4999}
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.025, rtol=0)
    # u at its largest (the clamp below the total) and weights that are not normalised
    tail = torch.zeros(2, 3000)
    tail[:, 2999] = 1e-20
    tail[:, 1] = 5.0
    assert set(sample_from(tail, g).tolist()) <= {1, 2999}


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7),
                                    SamplingParams(top_k=5), SamplingParams(top_p=0.5), SamplingParams(greedy=True)])
@pytest.mark.parametrize("vocab", [384, 32016])
def test_sample_and_score_draws_next_tokens_and_scores_the_full_distribution(params, vocab):
    from megatron_reft.generation.sampling import sample_and_score

    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(2)) * 3
    logits[5] = 0.0  # a row that only feeds its prompt: the engine hands it zero logits
    tokens, lp, ent = sample_and_score(logits.clone(), params, torch.Generator().manual_seed(3), 0.7)
    assert torch.equal(tokens, next_tokens(logits.clone(), params, torch.Generator().manual_seed(3)))
    logp = torch.log_softmax(logits.double() / 0.7, dim=-1)  # scored at 0.7 whatever was sampled
    torch.testing.assert_close(lp.double(), logp.gather(1, tokens[:, None])[:, 0], atol=2e-6, rtol=0)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), atol=2e-6, rtol=0)


@pytest.mark.parametrize("vocab", [384, 32016])
def test_rows_with_non_finite_logits_draw_no_token_and_the_others_are_unchanged(vocab):
    from megatron_reft.generation.sampling import NO_TOKEN, sample_and_score

    logits = torch.randn(5, vocab, generator=torch.Generator().manual_seed(4)) * 3
    broken = logits.clone()
    broken[1, 3], broken[3, vocab - 1] = float("nan"), float("inf")
    for params in (SamplingParams(), SamplingParams(greedy=True), SamplingParams(top_p=0.9)):
        clean = next_tokens(logits.clone(), params, torch.Generator().manual_seed(0))
        for tokens in (next_tokens(broken.clone(), params, torch.Generator().manual_seed(0)),
                       sample_and_score(broken.clone(), params, torch.Generator().manual_seed(0), 1.0)[0]):
            assert tokens[[1, 3]].tolist() == [NO_TOKEN, NO_TOKEN]
            assert torch.equal(tokens[[0, 2, 4]], clean[[0, 2, 4]])


def test_response_limits_and_prompt_checks():
    params = SamplingParams(max_new_tokens=400, max_total_length=700, max_prompt_length=300)
    assert response_limits([[1] * 10, [1] * 300], params) == [400, 400]
    assert response_limits([[1] * 299], SamplingParams(max_new_tokens=500)) == [401]
    with pytest.raises(ValueError, match="max_prompt_length"):
        response_limits([[1] * 301], params)
    with pytest.raises(ValueError, match="no room"):
        response_limits([[1] * 700], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        response_limits([[]], SamplingParams())
    with pytest.raises(ValueError, match="learned positions"):
        response_limits([[1] * 10], SamplingParams(max_new_tokens=100), max_positions=50)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_batch_bookkeeping_reads_the_device_once_per_step_and_tracks_own_slots():
    """_Batch.accept writes without boolean indexing (non-choosing rows write their own token
    back); step_finished brings the running count and the diverged count in one read; the
    cached 'some row starts past slot 0' flag follows compaction."""
    from megatron_reft.generation.generate import _Batch
    from megatron_reft.generation.sampling import NO_TOKEN
    from megatron_reft.reliability.errors import NonFiniteError

    batch = _Batch([[5, 6], [7, 8, 9], [4]], [3, 3, 3], eos_id=2, stops_at_eos=True, device="cpu")
    assert not batch.rows_at_own_slots()
    batch.start[batch.active] = torch.tensor([1, 0, 2])
    batch.moved()
    assert batch.rows_at_own_slots()
    # slot 3: local slots 2, 3, 1 — row 0 past its prompt (chooses), row 1 at its prompt's end
    # (chooses), row 2 at local 1 = its prompt length (chooses; EOS)
    batch.accept(torch.tensor([11, 12, 2]), 3)
    assert batch.tokens[0, :3].tolist() == [5, 6, 11] and batch.tokens[1, :4].tolist() == [7, 8, 9, 12]
    assert batch.tokens[2, :2].tolist() == [4, 2] and batch.generated.tolist() == [1, 1, 1]
    assert not batch.step_finished() and batch.running == 2 and batch.hit_eos.tolist() == [False, False, True]
    # slot 4: row 2 is finished, so it does not choose: its slot keeps its token, NO_TOKEN is not counted
    batch.accept(torch.tensor([13, 14, NO_TOKEN]), 4)
    assert batch.tokens[2, :3].tolist() == [4, 2, 0] and batch.generated.tolist() == [2, 2, 1]
    assert not batch.step_finished()
    batch.done[1] = True
    batch.accept(torch.tensor([NO_TOKEN, 0, 0]), 5)  # a choosing row drew from non-finite logits
    with pytest.raises(NonFiniteError, match="1 of 1 sequences at position 5"):
        batch.step_finished()
    # compaction: rows 1 and 2 done, row 0 (start 1) alone — then row 1 (start 0) alone
    batch.done[0] = False
    batch._step = (5, torch.tensor(1), torch.tensor(0))
    assert not batch.step_finished() and batch.running == 1
    batch.compact(None, 5)
    assert batch.n == 1 and batch.active.tolist() == [0] and batch.rows_at_own_slots()
    batch.start[0] = 0
    batch.done[:] = torch.tensor([True, False, True])
    batch.rows, batch.n = torch.arange(3), 3
    batch.moved()
    assert batch.rows_at_own_slots()  # row 2 still starts at 2
    assert not batch.step_finished() and batch.running == 1
    batch.compact(None, 5)
    assert batch.active.tolist() == [1] and not batch.rows_at_own_slots()
