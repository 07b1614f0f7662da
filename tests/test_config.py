"""Config as data: `defaults:` inheritance, dotted overrides with YAML typing, one-line errors
naming the key (unknown keys, wrong types, every validation rule), and the documentation of
every schema key in docs/configuration.md."""
from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from megatron_reft.config import Config, ConfigError, load_config, resolve_model_config, save_config, validate
from megatron_reft.config.load import apply_overrides, read_yaml_with_defaults
from megatron_reft.config.validate import world_size_from_env
from megatron_reft.models.families import ModelConfig

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- defaults inheritance
def test_defaults_inheritance_across_two_files(tmp_path):
    _write(tmp_path / "base" / "base.yaml", """
model: {preset: tiny-llama, num_layers: 4}
optim: {lr: 1.0e-5, schedule: linear, warmup_fraction: 0.1}
trainer: {epochs: 40, global_batch_size: 48, seed: 7}
""")
    child = _write(tmp_path / "child.yaml", """
defaults: base/base.yaml
optim: {lr: 3.0e-7, schedule: constant}
trainer: {epochs: 300}
""")
    config = load_config(child)
    assert config.model.preset == "tiny-llama" and config.model.num_layers == 4  # inherited section
    assert (config.optim.lr, config.optim.schedule) == (3e-7, "constant")  # child wins
    assert config.optim.warmup_fraction == 0.1  # sibling key of an overridden one survives
    assert (config.trainer.epochs, config.trainer.global_batch_size, config.trainer.seed) == (300, 48, 7)
    assert config.ppo.kl_coef == 0.05  # untouched sections keep the schema default


def test_defaults_list_chain_and_order(tmp_path):
    _write(tmp_path / "a.yaml", "trainer: {seed: 1, epochs: 1}\n")
    _write(tmp_path / "b.yaml", "defaults: [a.yaml]\ntrainer: {seed: 2}\n")
    _write(tmp_path / "c.yaml", "trainer: {seed: 3, log_interval: 5}\n")
    top = _write(tmp_path / "top.yaml", "defaults: [b.yaml, c.yaml]\ntrainer: {keep_last: 9}\n")
    data = read_yaml_with_defaults(top)
    assert "defaults" not in data
    # later parents win over earlier ones; the file itself wins over all; chains resolve
    assert data["trainer"] == {"seed": 3, "epochs": 1, "log_interval": 5, "keep_last": 9}


def test_defaults_errors(tmp_path):
    _write(tmp_path / "x.yaml", "defaults: y.yaml\n")
    _write(tmp_path / "y.yaml", "defaults: x.yaml\n")
    with pytest.raises(ConfigError, match="defaults: cycle"):
        load_config(tmp_path / "x.yaml")
    _write(tmp_path / "orphan.yaml", "defaults: missing.yaml\n")
    with pytest.raises(ConfigError, match="config: file not found: .*missing.yaml"):
        load_config(tmp_path / "orphan.yaml")
    with pytest.raises(ConfigError, match="config: file not found"):
        load_config(tmp_path / "nope.yaml")
    _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at top level"):
        load_config(tmp_path / "list.yaml")


def test_shipped_recipes_load():
    # every recipe parses against the schema (inheritance, types, no unknown keys); the
    # self-contained CPU ones (synthetic data, fresh model) also pass validation as a world of one
    paths = sorted((REPO / "configs").glob("*.yaml"))
    assert TINY in paths
    for path in paths:
        config = load_config(path)
        if config.data.train_file == "synthetic" and config.model.load is None:
            model = resolve_model_config(config, vocab_size=256)
            jobs = ("ppo",) if path.stem.endswith("_ppo") else ("sft", "ppo")  # a PPO-only recipe
            for job in jobs:
                validate(config, model, job=job, world_size=1)


# ---------------------------------------------------------------- overrides
def test_overrides_are_yaml_typed():
    config = load_config(TINY, [
        "optim.lr=1e-5",  # PyYAML reads this as a string; float fields accept it
        "optim.min_lr=0", "trainer.max_steps=6", "trainer.tensorboard=false", "trainer.wandb_project=null",
        "trainer.output_dir=/tmp/run 1", "data.max_eval_items=10", "model.num_layers=4",
        "ppo.kl_coef=0.01", "data.tokenizer=", "model.use_te=false",
    ])
    assert config.optim.lr == 1e-5 and isinstance(config.optim.lr, float)
    assert config.optim.min_lr == 0.0 and isinstance(config.optim.min_lr, float)  # int → float
    assert config.trainer.max_steps == 6 and config.trainer.tensorboard is False
    assert config.trainer.wandb_project is None and config.trainer.output_dir == "/tmp/run 1"
    assert (config.data.max_eval_items, config.model.num_layers, config.ppo.kl_coef) == (10, 4, 0.01)
    assert config.model.use_te == "false"  # a YAML boolean for a textual choice means the word
    assert config.data.tokenizer == ""  # `key=` is the empty string
    assert config.trainer.seed == 1234  # from the file


def test_overrides_win_and_create_sections():
    data = apply_overrides({"trainer": {"seed": 1, "epochs": 2}}, ["trainer.seed=5", "ppo.kl_coef=0.01"])
    assert data == {"trainer": {"seed": 5, "epochs": 2}, "ppo": {"kl_coef": 0.01}}
    original = {"trainer": {"seed": 1}}
    apply_overrides(original, ["trainer.seed=2"])
    assert original == {"trainer": {"seed": 1}}  # no mutation of the caller's dict


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"^trainer\.seed: overrides are written key=value$"):
        load_config(TINY, ["trainer.seed"])


# ---------------------------------------------------------------- unknown keys and types
@pytest.mark.parametrize("override, key", [
    ("trainer.nonsense=1", "trainer.nonsense"),
    ("bogus.x=1", "bogus"),
    ("optim.learning_rate=1e-5", "optim.learning_rate"),
])
def test_unknown_key_names_it(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: unknown key")


def test_unknown_key_in_file(tmp_path):
    path = _write(tmp_path / "bad.yaml", "trainer:\n  sed: 3\n")
    with pytest.raises(ConfigError, match=r"^trainer\.sed: unknown key"):
        load_config(path)


@pytest.mark.parametrize("override, key, expected", [
    ("trainer.global_batch_size=abc", "trainer.global_batch_size", "int"),
    ("trainer.epochs=true", "trainer.epochs", "int"),
    ("trainer.micro_batch_size=2.5", "trainer.micro_batch_size", "int"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("trainer.max_steps=[1, 2]", "trainer.max_steps", "int"),
    ("trainer.tensorboard=3", "trainer.tensorboard", "bool"),
    ("data.cot_type=7", "data.cot_type", "str"),
])
def test_wrong_type_names_key(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: expected {expected}, got ")


def test_section_must_be_a_mapping():
    with pytest.raises(ConfigError, match=r"^trainer: expected a mapping"):
        load_config(None, ["trainer=5"])


def test_save_config_round_trip(tmp_path):
    config = load_config(TINY, ["trainer.max_steps=6", "optim.lr=2e-4"])
    save_config(config, tmp_path / "run" / "config.yaml")
    assert not (tmp_path / "run" / "config.yaml.tmp").exists()
    assert load_config(tmp_path / "run" / "config.yaml") == config


# ---------------------------------------------------------------- validation
def _tiny(**overrides) -> tuple[Config, ModelConfig]:
    config = load_config(TINY, [f"{k}={v}" for k, v in overrides.items()])
    return config, resolve_model_config(config, vocab_size=256)


def _errors(config, model, job="sft", world_size=None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        validate(config, model, job=job, world_size=world_size)
    return str(err.value).splitlines()


def _only(lines: list[str], key: str, *fragments: str) -> None:
    assert len(lines) == 1, lines
    assert lines[0].startswith(key + ":"), lines
    for fragment in fragments:
        assert fragment in lines[0], lines


def test_tiny_recipe_is_valid_for_the_documented_layouts():
    for tp, pp, world in ((1, 1, 1), (2, 1, 2), (1, 2, 2), (2, 2, 4), (1, 1, 2), (2, 1, 4)):
        config, model = _tiny(**{"parallel.tensor_model_parallel_size": tp,
                                 "parallel.pipeline_model_parallel_size": pp})
        validate(config, model, job="sft", world_size=world)
        validate(config, model, job="ppo", world_size=world)


def test_tp_must_divide_heads():
    config, model = _tiny(**{"model.num_query_groups": 1, "parallel.tensor_model_parallel_size": 3})
    _only(_errors(config, model), "parallel.tensor_model_parallel_size", "model.num_attention_heads=4")


def test_tp_must_divide_query_groups():
    # 12 heads, 4 query groups: TP=3 divides the heads but not the groups
    config, model = _tiny(**{"model.hidden_size": 96, "model.num_attention_heads": 12,
                             "model.num_query_groups": 4, "parallel.tensor_model_parallel_size": 3})
    _only(_errors(config, model), "parallel.tensor_model_parallel_size", "model.num_query_groups=4")


def test_tp_may_be_a_multiple_of_query_groups():
    # megatron-core's rule: TP > groups replicates KV heads (tiny-llama: 4 heads, 2 groups)
    config, model = _tiny(**{"parallel.tensor_model_parallel_size": 4})
    validate(config, model, job="sft", world_size=4)


def test_pp_must_divide_layers():
    config, model = _tiny(**{"parallel.pipeline_model_parallel_size": 3})
    _only(_errors(config, model), "parallel.pipeline_model_parallel_size", "model.num_layers=2")


def test_layout_sizes_at_least_one():
    config, model = _tiny(**{"parallel.pipeline_model_parallel_size": 0})
    _only(_errors(config, model), "parallel.tensor_model_parallel_size", ">= 1")


def test_hidden_divisible_by_heads():
    config, model = _tiny(**{"model.hidden_size": 66})
    assert any(line.startswith("model.hidden_size:") for line in _errors(config, model))


def test_world_size_is_tp_pp_dp():
    config, model = _tiny(**{"parallel.tensor_model_parallel_size": 2})
    _only(_errors(config, model, world_size=3), "parallel.tensor_model_parallel_size", "world size 3")


def test_global_batch_divisible_by_micro_batch_times_dp():
    config, model = _tiny(**{"trainer.global_batch_size": 16, "trainer.micro_batch_size": 4})
    validate(config, model, world_size=4)  # 16 = 4 x DP 4
    _only(_errors(config, model, world_size=8), "trainer.global_batch_size", "4 x 8")
    config, model = _tiny(**{"trainer.global_batch_size": 18})
    _only(_errors(config, model, world_size=1), "trainer.global_batch_size")


def test_rollout_batch_divisible_by_dp():
    config, model = _tiny(**{"ppo.rollout_batch_size": 8, "trainer.global_batch_size": 12,
                             "trainer.micro_batch_size": 1})
    validate(config, model, job="ppo", world_size=2)
    lines = _errors(config, model, job="ppo", world_size=3)
    assert "ppo.rollout_batch_size: 8 is not divisible by DP=3" in lines, lines


def test_mini_batch_divides_rollout_batch():
    config, model = _tiny(**{"ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 3})
    _only(_errors(config, model, job="ppo", world_size=1), "ppo.mini_batch_size", "3")
    config, model = _tiny(**{"ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 2,
                             "trainer.micro_batch_size": 1, "trainer.global_batch_size": 4})
    _only(_errors(config, model, job="ppo", world_size=4), "ppo.mini_batch_size", "DP=4")


@pytest.mark.parametrize("key", ["data.train_file", "data.eval_file", "data.tokenizer", "model.load"])
def test_files_must_exist(key, tmp_path):
    missing = tmp_path / "missing.json"
    config = load_config(TINY, [f"{key}={missing}"])
    lines = _errors(config, ModelConfig(family="llama"))
    _only(lines, key, "not found", str(missing))


def test_synthetic_and_hf_sources_are_not_files():
    config, model = _tiny(**{"data.train_file": "hf:gsm8k:train", "data.eval_file": "synthetic"})
    validate(config, model, world_size=1)


def test_training_needs_a_train_file():
    config = load_config(TINY, ["data.train_file=null"])
    _only(_errors(config, ModelConfig()), "data.train_file", "required")
    validate(config, ModelConfig(), job="eval")


def test_model_needs_a_source():
    config = load_config(TINY, ["model.preset=null"])
    config.model.family = None
    assert "model.preset" in _errors(config, None)[0]


@pytest.mark.parametrize("override, key", [
    ("data.cot_type=latex", "data.cot_type"),
    ("data.format=csv", "data.format"),
    ("data.on_malformed=ignore", "data.on_malformed"),
    ("data.overlong_prompts=cut", "data.overlong_prompts"),
    ("optim.schedule=cosine", "optim.schedule"),
    ("model.dtype=fp8", "model.dtype"),
    ("model.use_te=maybe", "model.use_te"),
    ("ppo.align_prompts=sometimes", "ppo.align_prompts"),
    ("data.max_prompt_length=192", "data.max_prompt_length"),
    ("optim.warmup_fraction=1.0", "optim.warmup_fraction"),
    ("ppo.temperature=-1", "ppo.temperature"),
    ("ppo.top_p=0", "ppo.top_p"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size"),
])
def test_value_rules(override, key):
    config = load_config(TINY, [override])
    lines = _errors(config, None)
    _only(lines, key)


def test_learned_positions_bound_the_length():
    config, _ = _tiny(**{"data.max_length": 2048})
    model = ModelConfig(family="opt", num_layers=2, hidden_size=64, num_attention_heads=4,
                        max_position_embeddings=1024)
    _only(_errors(config, model), "data.max_length", "max_position_embeddings=1024")


def test_every_problem_reported_one_line_each(tmp_path):
    config, model = _tiny(**{"parallel.tensor_model_parallel_size": 3, "parallel.pipeline_model_parallel_size": 4,
                             "data.cot_type": "x", "data.tokenizer": str(tmp_path / "nope")})
    lines = _errors(config, model, world_size=5)
    keys = [line.split(":", 1)[0] for line in lines]
    assert set(keys) >= {"data.cot_type", "data.tokenizer", "parallel.tensor_model_parallel_size",
                         "parallel.pipeline_model_parallel_size"}
    assert all(re.match(r"^[a-z_]+\.[a-z_]+: \S", line) for line in lines), lines


def test_world_size_from_env(monkeypatch):
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert world_size_from_env() is None
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert world_size_from_env() == 8
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's wins
    assert world_size_from_env() == 2


def test_cli_config_error_exits_2_before_start_up(tmp_path, capsys, monkeypatch):
    """`megatron-reft sft` prints one line per problem and exits 2 (no process group made)."""
    import torch.distributed as dist

    from megatron_reft.sft import trainer

    monkeypatch.setenv("WORLD_SIZE", "3")
    code = trainer.main(["--config", str(TINY), "parallel.pipeline_model_parallel_size=2",
                         f"trainer.output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "config error:"
    assert err[1].startswith("parallel.tensor_model_parallel_size: world size 3")
    assert not dist.is_initialized() and not (tmp_path / "run").exists()
    monkeypatch.delenv("WORLD_SIZE")
    assert trainer.main(["--config", str(TINY), "trainer.bogus=1"]) == 2
    assert capsys.readouterr().err.splitlines()[1].startswith("trainer.bogus: unknown key")
    # no launcher variables: a plain `python` run is a world of one, and batch rules still apply
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert trainer.main(["--config", str(TINY), "trainer.global_batch_size=18",
                         f"trainer.output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err.splitlines()[1].startswith("trainer.global_batch_size: 18 is not divisible")
    assert not (tmp_path / "run").exists()


def test_resolve_model_config_layers():
    config = load_config(TINY, ["model.num_layers=4"])
    model = resolve_model_config(config, vocab_size=300)
    assert (model.family, model.num_layers, model.hidden_size, model.vocab_size) == ("llama", 4, 64, 300)
    config = load_config(TINY, ["model.vocab_size=1000"])
    assert resolve_model_config(config, vocab_size=300).vocab_size == 1000  # explicit field wins


# ---------------------------------------------------------------- docs/configuration.md
def _schema_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def test_every_schema_key_is_documented():
    doc = (REPO / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"`([a-z_]+\.[a-z_0-9]+)`", doc))
    missing = [key for key in _schema_keys() if key not in documented]
    assert not missing, f"docs/configuration.md lacks: {', '.join(missing)}"
    # and has no table row for a key that does not exist (any more)
    rows = re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", doc, re.M)
    stale = sorted(set(rows) - set(_schema_keys()))
    assert not stale, f"docs/configuration.md documents unknown keys: {', '.join(stale)}"


def test_documented_defaults_match_schema():
    """Each key's table row states the schema default."""
    doc = (REPO / "docs" / "configuration.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|[^|]*\| `([^`]*)` \|", doc, re.M)}
    config = Config()
    wrong = []
    for key in _schema_keys():
        section, name = key.split(".")
        default = getattr(getattr(config, section), name)
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
        if key in rows and rows[key] != shown and _number(rows[key]) != default:
            wrong.append(f"{key}: doc says {rows[key]}, schema {shown}")
    assert not wrong, wrong
    assert len(rows) >= len(_schema_keys())


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None
