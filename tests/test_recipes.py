"""The recipes in configs/ (issue 6): the paper's runs with reft.md §5 settings, scale-out layouts,
and every one passes validation — layout, batch and memory rules on its planned GPUs — with the
data and checkpoint paths pointed at stand-in files (the real ones are the user's downloads)."""
from __future__ import annotations

from pathlib import Path

import pytest

from megatron_reft import planning
from megatron_reft.config import load_config, resolve_model_config, validate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_MODELS = ("codellama-7b", "galactica-6.7b")
PAPER_RUNS = [("gsm8k", "ncot"), ("gsm8k", "pcot"), ("svamp", "ncot"), ("svamp", "pcot"),
              ("mathqa", "ncot"), ("mathqa", "pcot"), ("mathqa-numeric", "ncot")]
SCALE_OUT = {"codellama-13b": 8, "codellama-34b": 16, "llama2-70b": 32}  # planned GPUs
RECIPES = sorted(p.name for p in CONFIGS.glob("*_*_*_*.yaml") if p.stem.endswith(("_sft", "_ppo")))


def job_of(name: str) -> str:
    return "ppo" if name.endswith("_ppo.yaml") else "sft"


def load_recipe(name: str, tmp_path: Path, *extra: str):
    """The recipe with its files replaced by stand-ins; the architecture then comes from the
    preset (model.load is what a converted checkpoint would provide)."""
    stand_in = tmp_path / "data.json"
    stand_in.write_text("[]")
    overrides = [f"data.train_file={stand_in}", "model.load=null"]
    if "eval_file" in (CONFIGS / name).read_text():
        overrides.append(f"data.eval_file={stand_in}")
    config = load_config(CONFIGS / name, overrides + list(extra))
    return config, resolve_model_config(config)


def test_the_paper_runs_and_the_scale_out_recipes_exist():
    expected = {f"{m}_{d}_{c}_{s}.yaml" for m in PAPER_MODELS for d, c in PAPER_RUNS for s in ("sft", "ppo")}
    expected |= {f"galactica-125m_{d}_pcot_{s}.yaml" for d in ("gsm8k", "svamp", "mathqa") for s in ("sft", "ppo")}
    expected |= {f"{m}_gsm8k_pcot_{s}.yaml" for m in SCALE_OUT for s in ("sft", "ppo")}
    assert expected <= set(RECIPES), sorted(expected - set(RECIPES))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_passes_validation_on_its_planned_gpus(name, tmp_path):
    config, model = load_recipe(name, tmp_path)
    p = config.parallel
    assert p.gpu_memory_gb == 80 and p.planned_world_size, "recipes are planned for 80 GB GPUs"
    validate(config, model, job=job_of(name), world_size=p.planned_world_size)  # includes the memory plan
    # And they fit whichever attention kernel the cluster provides (TE fused or the local spec).
    for attention in ("flash", "local"):
        use_te = "true" if attention == "flash" else "false"
        config, model = load_recipe(name, tmp_path, f"model.use_te={use_te}")
        plan = planning.make_plan(config, model, job_of(name), p.planned_world_size)
        assert plan.total_gib <= planning.WARN_FRACTION * p.gpu_memory_gb, (attention, plan.table())


@pytest.mark.parametrize("name", RECIPES)
def test_micro_batches_divide_each_ranks_share(name, tmp_path):
    """No padded filler micro-batches: a rank's share of the batch splits evenly."""
    config, _ = load_recipe(name, tmp_path)
    p, t = config.parallel, config.trainer
    dp = p.planned_world_size // (p.tensor_model_parallel_size * p.pipeline_model_parallel_size)
    share = config.ppo.rollout_batch_size // dp if job_of(name) == "ppo" else t.global_batch_size // dp
    assert share % t.micro_batch_size == 0, (share, t.micro_batch_size)
    if p.pipeline_model_parallel_size > 1:  # enough micro-batches to fill the pipeline
        assert share // t.micro_batch_size >= p.pipeline_model_parallel_size


def _paper_sft_epochs(model: str, dataset: str, cot: str) -> tuple[int, int]:
    """(warm-up checkpoint epoch, epochs of the linear schedule) - reft.md §5; for
    Galactica-125M the reference's exps/small_model_exps scripts (epoch 10 of 40; MathQA 40 of 100)."""
    if model == "galactica-125m":
        return (40, 100) if dataset == "mathqa" else (10, 40)
    if dataset == "mathqa-numeric":
        return 10, 40
    return (5 if (dataset, cot) == ("mathqa", "ncot") else 2), 40


def _paper_kl(model: str, dataset: str, cot: str) -> float:
    return 0.01 if model == "galactica-125m" or cot == "pcot" or dataset == "mathqa-numeric" else 0.05


@pytest.mark.parametrize("name", RECIPES)
def test_recipes_carry_the_reference_settings(name, tmp_path):
    """reft.md §5, checked value by value."""
    model, dataset, cot, stage = Path(name).stem.split("_")
    config, _ = load_recipe(name, tmp_path)
    o, t, d, ppo = config.optim, config.trainer, config.data, config.ppo
    small = model == "galactica-125m"
    assert config.model.dtype == "bf16" and config.data.cot_type == cot
    assert (o.weight_decay, o.adam_eps, o.clip_grad) == (0.0, 1e-8, 1.0)
    assert Path(d.train_file).name == "data.json"  # the stand-in replaced the recipe's file
    train_file = load_config(CONFIGS / name).data.train_file
    assert train_file == f"data/{dataset}_{'nl' if cot == 'ncot' else 'python_sdp'}.json"
    if stage == "sft":
        assert (o.lr, o.schedule, o.warmup_fraction) == (2e-5 if small else 1e-5, "linear", 0.1)
        assert (t.global_batch_size, d.max_length, d.overlong_prompts) == (48, 1024, "truncate")
        assert (t.epochs, o.planned_epochs) == _paper_sft_epochs(model, dataset, cot)
    else:
        assert (o.lr, o.schedule) == (3e-6 if small else 3e-7, "constant")
        assert (ppo.rollout_batch_size, t.epochs) == ((256, 700) if small else (32, 300))
        assert (ppo.ppo_epochs, ppo.mini_batch_size, ppo.temperature) == (2, None, 1.0)
        assert (d.max_prompt_length, d.max_total_length, d.overlong_prompts) == (300, 700, "truncate")
        assert ppo.kl_coef == _paper_kl(model, dataset, cot)
        assert (ppo.gamma, ppo.lam, ppo.clip_eps, ppo.value_clip, ppo.vf_coef) == (1.0, 0.95, 0.2, 0.2, 5.0)
        assert load_config(CONFIGS / name).model.load == f"ckpt/{model}_{dataset}_{cot}_sft"
        assert load_config(CONFIGS / name).data.eval_file == f"data/{dataset}_test_set.json"


def test_scale_out_layouts_span_nodes_and_use_gqa_where_the_model_has_it(tmp_path):
    for model, gpus in SCALE_OUT.items():
        config, arch = load_recipe(f"{model}_gsm8k_pcot_ppo.yaml", tmp_path)
        assert config.parallel.planned_world_size == gpus
        assert config.parallel.tensor_model_parallel_size <= 8, "TP stays inside an 8-GPU node"
        assert config.parallel.use_distributed_optimizer
        if model != "codellama-13b":
            assert arch.num_query_groups < arch.num_attention_heads  # grouped-query attention


# ---------------------------------------------------------------- the baselines (issue 13)
BASELINES = ("sft-best", "offline-st", "online-st", "rm")
BASELINE_RECIPES = [f"{m}_{d}_{c}_{b}.yaml" for m in PAPER_MODELS for d, c in PAPER_RUNS for b in BASELINES]


def _baseline_job(name: str) -> str:
    return "ppo" if name.endswith("_online-st.yaml") else "sft"


def _load_baseline(name: str, tmp_path: Path):
    """load_recipe, with the eval file (often inherited) also replaced by the stand-in."""
    return load_recipe(name, tmp_path, f"data.eval_file={tmp_path / 'data.json'}")


def test_every_paper_run_has_its_baseline_recipes():
    present = {p.name for p in CONFIGS.glob("*.yaml")}
    assert set(BASELINE_RECIPES) <= present, sorted(set(BASELINE_RECIPES) - present)


@pytest.mark.parametrize("name", BASELINE_RECIPES)
def test_baseline_recipes_pass_validation_on_their_planned_gpus(name, tmp_path):
    config, model = _load_baseline(name, tmp_path)
    validate(config, model, job=_baseline_job(name), world_size=config.parallel.planned_world_size)


@pytest.mark.parametrize("name", BASELINE_RECIPES)
def test_baseline_recipes_carry_the_papers_settings(name, tmp_path):
    """reft.md §6, value by value, on top of the run's SFT / PPO recipe."""
    model, dataset, cot, method = Path(name).stem.split("_")
    raw = load_config(CONFIGS / name)
    config, _ = _load_baseline(name, tmp_path)
    o, t, d = config.optim, config.trainer, config.data
    assert d.cot_type == cot and config.model.dtype == "bf16"
    warm_up, schedule = _paper_sft_epochs(model, dataset, cot)
    if method == "sft-best":  # the whole 40-epoch run, evaluated every epoch, warm-up epoch kept
        assert (t.epochs, o.planned_epochs, o.lr, t.eval_accuracy) == (schedule, schedule, 1e-5, True)
        assert t.keep_epochs == [warm_up] and raw.data.eval_file == f"data/{dataset}_test_set.json"
    elif method == "offline-st":  # SFT from the BASE model, 20 epochs, lr 1e-5, on the sampled file
        assert (t.epochs, o.planned_epochs, o.lr, o.schedule) == (20, 20, 1e-5, "linear")
        assert raw.model.load == f"ckpt/{model}" and raw.data.train_file.endswith("_offline-st-data/train.jsonl")
        assert raw.data.eval_file == f"data/{dataset}_test_set.json"
    elif method == "online-st":  # ReFT's loop and settings, no KL
        ppo = load_config(CONFIGS / name.replace("_online-st", "_ppo")).ppo
        assert config.ppo.kl_coef == 0.0 and (o.lr, t.epochs) == (3e-7, 300)
        assert (config.ppo.rollout_batch_size, config.ppo.ppo_epochs, config.ppo.temperature) == \
            (ppo.rollout_batch_size, ppo.ppo_epochs, ppo.temperature)
        assert raw.model.load == f"ckpt/{model}_{dataset}_{cot}_sft"
    else:  # rm: from the SFT checkpoint, lr 1e-6, 3 epochs, length 700
        assert (o.lr, t.epochs, o.planned_epochs, d.max_total_length) == (1e-6, 3, 3, 700)
        assert raw.model.load == f"ckpt/{model}_{dataset}_{cot}_sft"
    assert t.output_dir == f"runs/{Path(name).stem}"


SEPARATE_CRITIC = sorted(p.name for p in CONFIGS.glob("*_ppo_separate-critic.yaml"))


def test_separate_critic_variants_of_the_paper_7b_runs(tmp_path):
    """The ablation setting (reft.md §4, §8; issue 12): each paper 7B PPO run with a separate
    value model on 8 GPUs of its own; everything else is the base recipe's, and both roles fit."""
    expected = {f"{m}_{d}_{c}_ppo_separate-critic.yaml" for m in PAPER_MODELS for d, c in PAPER_RUNS}
    assert set(SEPARATE_CRITIC) == expected
    for name in SEPARATE_CRITIC:  # (the eval file is inherited: load_recipe would not see it)
        config, model = load_recipe(name, tmp_path, f"data.eval_file={tmp_path / 'data.json'}")
        c = config.critic
        assert (c.mode, c.world_size, c.tensor_model_parallel_size, config.parallel.planned_world_size) == \
            ("separate", 8, 2, 16)
        raw, raw_base = load_config(CONFIGS / name), load_config(CONFIGS / name.replace("_separate-critic", ""))
        assert (raw.ppo, raw.optim, raw.data, raw.model) == (raw_base.ppo, raw_base.optim, raw_base.data, raw_base.model)
        assert raw.trainer.output_dir == raw_base.trainer.output_dir + "_separate-critic"
        validate(config, model, job="ppo", world_size=16)
        plan = planning.make_plan(config, model, "ppo", 16)
        assert (plan.layout.world, plan.critic.layout.world) == (8, 8) and plan.fits(), plan.table()
