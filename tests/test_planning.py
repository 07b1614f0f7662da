"""The memory plan (issue 6): a hand calculation for CodeLlama-7B at TP=2, the formulas against
the real megatron-core model (parameters per rank under TP × PP, tensors saved for backward),
and the validation hook that warns about or refuses a layout that cannot fit."""
from __future__ import annotations

import json

import pytest
import torch

from dist_utils import run_distributed
from megatron_reft import planning
from megatron_reft.config import ConfigError, load_config, validate
from megatron_reft.models.families import ModelConfig, model_config_from_preset

GIB = 2**30


def codellama_7b_config(*overrides: str):
    """The 7B recipe's layout (configs/model_codellama-7b.yaml) on 8 GPUs, written out."""
    return load_config(None, [
        "model.preset=codellama-7b", "model.dtype=bf16", "model.use_te=true", "data.train_file=synthetic",
        "parallel.tensor_model_parallel_size=2", "parallel.use_distributed_optimizer=true",
        "parallel.planned_world_size=8", "parallel.gpu_memory_gb=80",
        "trainer.global_batch_size=48", "trainer.micro_batch_size=4", "data.max_length=1024",
        "data.max_prompt_length=300", "data.max_total_length=700", "ppo.rollout_batch_size=32",
        *overrides])


def items(plan) -> dict:
    out = {i.name: i.bytes for i in plan.resident}
    for phase in plan.phases.values():
        out.update({i.name: i.bytes for i in phase})
    return out


# ---------------------------------------------------------------- hand calculation
# CodeLlama-7B: 32 layers, hidden 4096, 32 heads (no GQA), FFN 11008 (SwiGLU), vocabulary 32016.
# One layer on one of 2 TP ranks:
#   attention 4096·(4096 + 2·4096) + 4096² = 67,108,864; MLP 3·4096·11008 = 135,266,304
#   → (67,108,864 + 135,266,304) / 2 = 101,187,584, + 2 RMSNorm weights 8,192 = 101,195,776
#   × 32 layers = 3,238,264,832
# Vocabulary padded to a multiple of 128·TP = 256: 32,256; embedding and output layer shards
#   32,256·4096 / 2 = 66,060,288 each; final norm 4,096.
PARAMS_PER_RANK = 3_238_264_832 + 2 * 66_060_288 + 4_096  # = 3,370,389,504
WEIGHTS = PARAMS_PER_RANK * 2  # bf16                         6,740,779,008
GRADS = PARAMS_PER_RANK * 4  # fp32 main grads                 13,481,558,016
ADAM_DIST = PARAMS_PER_RANK * 12 // 4  # ÷ DP=4                10,111,168,512
OVERHEAD = int(2.5 * GIB)  #                                   2,684,354,560
# SFT activations, flash attention, fused SwiGLU, per token per layer (bytes):
#   norms 2·(2 + 2)·4096 = 32,768; Q,K,V,out 2·(4096 + 8192 + 4096)/2 = 16,384;
#   MLP 2·3·11008/2 = 33,024 → 82,176; × 1024·4 tokens × 32 layers
SFT_ACTIVATIONS = 82_176 * 4_096 * 32  #                      10,770,972,672
SFT_LOGITS = 4_096 * 16_128 * 22  # chunk × V/TP × 22 B         1,453,326,336
# Local attention adds the fp32 softmax output and its bf16 copy: 16 heads/rank · 1024² · 4 · 6 B
LOCAL_SCORES = 16 * 1024**2 * 4 * 6 * 32  #                   12,884,901,888
# Full recomputation: each layer's 2-byte input (1024·4·4096·2) + one layer rebuilt
RECOMPUTE_ACTIVATIONS = 32 * 1024 * 4 * 4096 * 2 + 82_176 * 4_096  # 1,410,334,720
# PPO: 8 rollouts per DP rank, micro-batches of 4 × 700 tokens; reference = the policy's weights
PPO_ACTIVATIONS = 82_176 * 2_800 * 32  #                       7,363,338,240
PPO_LOGITS = 2_800 * 16_128 * 22  #                              993,484,800
KV_CACHE = 2 * 32 * 16 * 128 * 700 * 8 * 2  # k,v · layers · KV heads/rank · head dim · tokens · prompts · 2 B
PREFILL = 300 * 8 * 2 * 11_008 // 2 * 2  # one layer's SwiGLU input for 8 × 300 prompt tokens


def test_codellama_7b_sft_plan_matches_the_hand_calculation():
    config = codellama_7b_config()
    model = model_config_from_preset("codellama-7b")
    assert planning.stage_parameters(model, 2, 1)["max"] == PARAMS_PER_RANK
    plan = planning.make_plan(config, model, "sft")
    assert (plan.layout.tp, plan.layout.pp, plan.layout.dp) == (2, 1, 4)
    assert items(plan) == pytest.approx({
        "weights": WEIGHTS, "gradients (fp32 main grads)": GRADS, "optimizer state (Adam)": ADAM_DIST,
        "runtime overhead": OVERHEAD, "activations": SFT_ACTIVATIONS, "logits chunk (fp32)": SFT_LOGITS})
    total = WEIGHTS + GRADS + ADAM_DIST + OVERHEAD + SFT_ACTIVATIONS + SFT_LOGITS
    assert plan.total_bytes == pytest.approx(total)
    assert plan.total_gib == pytest.approx(42.135, abs=0.001)  # 45,242,159,104 bytes
    assert plan.fits()


def test_codellama_7b_variants_change_exactly_the_expected_items():
    model = model_config_from_preset("codellama-7b")
    local = items(planning.make_plan(codellama_7b_config("model.use_te=false"), model, "sft"))
    assert local["activations"] == pytest.approx(SFT_ACTIVATIONS + LOCAL_SCORES)
    recompute = items(planning.make_plan(codellama_7b_config("model.recompute=true"), model, "sft"))
    assert recompute["activations"] == pytest.approx(RECOMPUTE_ACTIVATIONS)
    plain = items(planning.make_plan(codellama_7b_config("parallel.use_distributed_optimizer=false"), model, "sft"))
    assert plain["optimizer state (Adam)"] == pytest.approx(PARAMS_PER_RANK * 12)


def test_codellama_7b_ppo_plan_matches_the_hand_calculation():
    plan = planning.make_plan(codellama_7b_config(), model_config_from_preset("codellama-7b"), "ppo")
    got = items(plan)
    assert got["reference model (frozen)"] == pytest.approx(WEIGHTS)
    assert got["KV cache"] == pytest.approx(KV_CACHE)
    assert got["prefill working set"] == pytest.approx(PREFILL)
    assert got["activations"] == pytest.approx(PPO_ACTIVATIONS)
    assert got["logits chunk (fp32)"] == pytest.approx(PPO_LOGITS)
    assert plan.peak_phase == "update"  # PPO updates need more than rollouts here
    resident = WEIGHTS + GRADS + ADAM_DIST + WEIGHTS + OVERHEAD
    assert plan.total_bytes == pytest.approx(resident + PPO_ACTIVATIONS + PPO_LOGITS)
    offloaded = planning.make_plan(codellama_7b_config("ppo.ref_offload=true"),
                                   model_config_from_preset("codellama-7b"), "ppo")
    assert plan.total_bytes - offloaded.total_bytes == pytest.approx(WEIGHTS)


def test_grouped_query_attention_shrinks_the_kv_cache():
    """CodeLlama-34B: 64 query heads share 8 KV groups → at TP=8 one KV head per GPU."""
    model = model_config_from_preset("codellama-34b")
    layout = planning.Layout(tp=8, pp=1, dp=2)
    gqa = planning.kv_cache_bytes(model, layout, seq=700, prompts=16, act_bytes=2)
    assert gqa == 2 * 48 * 1 * 128 * 700 * 16 * 2
    mha = planning.kv_cache_bytes(ModelConfig(**{**model.__dict__, "num_query_groups": 64}), layout, 700, 16, 2)
    assert mha == 8 * gqa


# ---------------------------------------------------------------- validation hook
def test_validation_refuses_a_layout_that_cannot_fit():
    model = model_config_from_preset("codellama-7b")
    config = codellama_7b_config("parallel.tensor_model_parallel_size=1", "trainer.micro_batch_size=2",
                                 "parallel.use_distributed_optimizer=false")
    with pytest.raises(ConfigError) as err:
        validate(config, model, job="ppo", world_size=8)
    message = str(err.value)
    assert message.startswith("parallel.gpu_memory_gb: the ppo memory plan needs")
    assert "parallel.use_distributed_optimizer=true" in message  # says what would help


def test_validation_warns_near_the_limit_and_skips_without_a_size(capsys):
    model = model_config_from_preset("codellama-7b")
    plan = planning.make_plan(codellama_7b_config(), model, "sft")
    near = codellama_7b_config(f"parallel.gpu_memory_gb={plan.total_gib / 0.95:.3f}")
    validate(near, model, job="sft", world_size=8)  # fits, but within 10% of the limit
    assert "config warning: parallel.gpu_memory_gb" in capsys.readouterr().err
    validate(codellama_7b_config("parallel.gpu_memory_gb=null", "parallel.tensor_model_parallel_size=1",
                                 "trainer.micro_batch_size=2"),
             model, job="sft", world_size=8)  # unknown GPU size: no memory check


def test_plan_command_prints_a_table_and_json(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {preset: codellama-7b, load: ckpt/missing}\n"
                      "parallel: {tensor_model_parallel_size: 2, use_distributed_optimizer: true,"
                      " gpu_memory_gb: 80, planned_world_size: 8}\n"
                      "data: {train_file: data/missing.json}\n")
    assert planning.main(["--config", str(recipe), "--job", "sft", "--skip-file-checks"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: sft · codellama-7b · TP=2 PP=1 DP=4" in out and "-> fits" in out
    assert planning.main(["--config", str(recipe), "--json", "--skip-file-checks", "--job", "ppo",
                          "--world-size", "8", "--attention", "local"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == {"tp": 2, "pp": 1, "dp": 4} and report["peak_phase"] in ("rollout", "update")
    assert "KV cache" in report["phases_gib"]["rollout"] and report["fits"] is True
    # Without --skip-file-checks the missing files are errors (exit 2), after the table.
    assert planning.main(["--config", str(recipe), "--job", "sft"]) == 2
    assert "data.train_file: not found" in capsys.readouterr().err


# ---------------------------------------------------------------- against the real model
SMALL = {"llama": dict(family="llama", num_layers=4, hidden_size=128, num_attention_heads=4,
                       num_query_groups=2, ffn_hidden_size=384, vocab_size=300, max_position_embeddings=256),
         "opt": dict(family="opt", num_layers=4, hidden_size=128, num_attention_heads=4,
                     ffn_hidden_size=384, vocab_size=300, max_position_embeddings=256)}


def _saved_tensor_bytes(model_cfg: ModelConfig, seq: int, batch: int, recompute: bool) -> int:
    """Bytes of distinct non-parameter storages autograd keeps after a bf16 training forward."""
    from megatron.core.transformer.module import Float16Module

    from megatron_reft.engine import causal_mask
    from megatron_reft.models.build import build_model, init_weights

    # the formula's "local" attention is megatron's own (SDPA keeps less: the plan is an upper bound)
    gpt = build_model(model_cfg, dtype=torch.bfloat16, recompute=recompute, attention="megatron")
    init_weights(gpt, model_cfg, 1)
    module = Float16Module(gpt.config, gpt)
    module.train()
    params = {p.untyped_storage().data_ptr() for p in gpt.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(0)
    tokens = torch.randint(0, model_cfg.vocab_size, (batch, seq))
    positions = torch.arange(seq).expand(batch, seq)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(tokens, positions, causal_mask(seq), return_hidden=True)
    return sum(seen.values())


def _measure_worker(rank, world_size, seq, batch):
    """On 2 ranks: parameters per rank at TP=2 and at PP=2 (stage 0 or 1); per-layer saved bytes
    at TP=2 (a 4-layer minus a 2-layer model, so embedding and final norm cancel)."""
    torch.set_num_threads(1)
    from megatron.core import parallel_state as ps

    from megatron_reft.distributed import init as dist_init
    from megatron_reft.models.build import build_model

    out = {"params": {}, "per_layer": {}}
    for tp, pp in ((2, 1), (1, 2)):
        dist_init.initialize(tp, pp, seed=1)  # re-initialises megatron's groups for each layout
        stage = "first" if ps.is_pipeline_first_stage() else "last"
        for family, shape in SMALL.items():
            params = sum(p.numel() for p in build_model(ModelConfig(**shape)).parameters())
            out["params"][(family, tp, pp)] = (stage, params)
    dist_init.initialize(2, 1, seed=1)
    for family, shape in SMALL.items():
        for recompute in (False, True):
            sizes = [_saved_tensor_bytes(ModelConfig(**{**shape, "num_layers": n}), seq, batch, recompute)
                     for n in (2, 4)]
            out["per_layer"][(family, recompute)] = (sizes[1] - sizes[0]) / 2
    dist_init.shutdown()
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(_measure_worker, 2, 64, 2, init_process_group=False, timeout_s=300)


def test_parameters_per_rank_match_the_built_model_under_tp_and_pp(measured):
    for family, shape in SMALL.items():
        for tp, pp in ((2, 1), (1, 2)):
            expected = planning.stage_parameters(ModelConfig(**shape), tp=tp, pp=pp)
            for rank in measured:  # exact: norms replicated, biases split as megatron splits them
                stage, params = rank["params"][(family, tp, pp)]
                assert params == expected[stage], (family, tp, pp, stage)


def test_activation_formula_matches_saved_tensors_at_tp2(measured):
    """The local (CPU) spec differs from the GPU defaults in two measured places: torch's
    composite RMSNorm keeps fp32 copies and SwiGLU runs unfused; with those two parameters the
    formula must match what autograd actually keeps, within RoPE's small cos/sin tables."""
    for family, shape in SMALL.items():
        model = ModelConfig(**shape)
        predicted = planning.layer_activation_bytes(
            model, 64, 2, 2, act_bytes=2, attention="local", fused_swiglu=False,
            norm_saved_bytes=8 if family == "llama" else 2)
        per_layer = measured[0]["per_layer"]  # rank 0's shard (rank 1 holds the same sizes)
        assert per_layer[(family, False)] == pytest.approx(predicted, rel=0.03), family
        # Full recomputation keeps each layer's bf16 input only.
        assert per_layer[(family, True)] == 64 * 2 * model.hidden_size * 2


# ---------------------------------------------------------------- separate critic (issue 12)
def test_separate_critic_plans_both_roles_and_refuses_impossible_splits(capsys):
    """On ranks of its own the critic's GPUs hold its trunk + optimizer and its update's
    activations (no KV cache, no reference, no logits); on the actor's ranks its state adds to
    the policy's. Impossible splits are one line, exit 2."""
    model = model_config_from_preset("codellama-7b")
    shared = planning.make_plan(codellama_7b_config(), model, "ppo")
    split = planning.make_plan(codellama_7b_config("critic.mode=separate", "critic.world_size=8",
                                                   "critic.tensor_model_parallel_size=2",
                                                   "parallel.planned_world_size=16"), model, "ppo")
    assert split.layout == shared.layout and split.total_bytes == pytest.approx(shared.total_bytes)
    critic = split.critic
    assert (critic.layout.tp, critic.layout.dp) == (2, 4) and "KV cache" not in items(critic)
    assert critic.total_bytes == pytest.approx(WEIGHTS + GRADS + ADAM_DIST + OVERHEAD + PPO_ACTIVATIONS)
    beside = planning.make_plan(codellama_7b_config("critic.mode=separate"), model, "ppo")
    assert beside.critic is None
    assert beside.total_bytes - shared.total_bytes == pytest.approx(WEIGHTS + GRADS + ADAM_DIST)
    recipe = "configs/codellama-7b_gsm8k_pcot_ppo_separate-critic.yaml"
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    for bad, says in (("critic.world_size=16", "critic.world_size: 16 leaves no actor rank in a world of 16"),
                      ("critic.world_size=3", "critic.world_size: 3 is not a multiple of critic TP x PP = 2 x 1")):
        assert planning.main(["--config", str(root / recipe), "--skip-file-checks", "--job", "ppo", bad]) == 2
        assert capsys.readouterr().err.strip().splitlines()[1:] == [says]
    # Fits the GPU count but not the memory: the critic's own line.
    assert planning.main(["--config", str(root / recipe), "--skip-file-checks", "--job", "ppo",
                          "critic.world_size=1", "critic.tensor_model_parallel_size=1",
                          "parallel.planned_world_size=9"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("critic.world_size: the critic's memory plan needs") and len(lines) == 2
