"""ReFT end to end on the real SmolLM2-135M-Instruct, through the CLI the way a user runs it
(issue 9): the recipes configs/smollm2-135m_svamp_{sft,ppo}.yaml with model.load at the
converted checkpoint and data.tokenizer at the de-quantised HF directory, on small subsets of
the real SVAMP files.

- warm-up SFT, 2 steps each on N-CoT and on P-CoT records (side by side, 2 cores);
- ReFT PPO, 2 steps from the P-CoT warm-up checkpoint: rollouts sampled from the real model,
  programs scored in the sandbox, greedy evaluation at the end;
- `megatron-reft eval` of the N-CoT warm-up checkpoint (the N-CoT scoring path);
- `convert megatron-to-hf` of the PPO checkpoint: the directory loads with
  AutoModelForCausalLM / AutoTokenizer and generates; value_head.safetensors sits beside it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from smollm2 import EOS_ID, write_subset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TRAIN_ITEMS, TEST_ITEMS = 8, 4
STEPS = 2
# Short sequences keep this to a few minutes on 2 cores. With this tokenizer the first 8 SVAMP
# records are <= 253 tokens as SFT examples and <= 157 as P-CoT RL prompts (pre-filled header).
SMALL = ["data.max_length=256", "data.max_prompt_length=160", "data.max_total_length=224",
         "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.progress_bar=false",
         "trainer.tensorboard=false", "model.dtype=fp32", f"trainer.max_steps={STEPS}"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_reft.cli", *args]


def _start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=1800)  # generous: a loaded 2-core machine is many times slower
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{out[-3000:]}\n{err[-6000:]}"
    return out


def _latest(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(smollm2, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2_reft")
    data = {"ncot": write_subset("svamp_nl.json", TRAIN_ITEMS, root / "ncot.json"),
            "pcot": write_subset("svamp_python_sdp.json", TRAIN_ITEMS, root / "pcot.json"),
            "test": write_subset("svamp_test_set.json", TEST_ITEMS, root / "test.json")}
    user = [f"model.load={smollm2.ckpt}", f"data.tokenizer={smollm2.hf_dir}"]
    out = {name: root / name for name in ("sft_ncot", "sft_pcot", "ppo", "eval_ncot", "export")}
    sft = {cot: _start(_cli("sft", "--config", str(CONFIGS / "smollm2-135m_svamp_sft.yaml"), *user, *SMALL,
                            f"data.train_file={data[cot]}", f"data.cot_type={cot}",
                            f"trainer.output_dir={out['sft_' + cot]}"), root)
           for cot in ("ncot", "pcot")}
    logs = {f"sft_{cot}": _wait(proc) for cot, proc in sft.items()}
    ppo = _start(_cli("ppo", "--config", str(CONFIGS / "smollm2-135m_svamp_ppo.yaml"), *user, *SMALL,
                      f"model.load={_latest(out['sft_pcot'])}", f"data.train_file={data['pcot']}",
                      f"data.eval_file={data['test']}", "ppo.rollout_batch_size=4", "reward.num_workers=1",
                      f"trainer.output_dir={out['ppo']}"), root)
    evaluation = _start(_cli("eval", "--config", str(CONFIGS / "smollm2-135m_svamp_sft.yaml"),
                             "--ckpt", str(_latest(out["sft_ncot"])), *user, *SMALL,
                             f"data.train_file={data['ncot']}", f"data.eval_file={data['test']}",
                             "reward.num_workers=1", f"trainer.output_dir={out['eval_ncot']}"), root)
    logs["ppo"], logs["eval_ncot"] = _wait(ppo), _wait(evaluation)
    logs["export"] = _wait(_start(_cli("convert", "megatron-to-hf", "--ckpt", str(_latest(out["ppo"])),
                                       "--out", str(out["export"])), root))
    return out, logs


def test_warmup_sft_trains_on_real_ncot_and_pcot_records(runs):
    out, _ = runs
    for cot in ("ncot", "pcot"):
        rows = [m for m in _metrics(out[f"sft_{cot}"]) if "loss" in m]
        assert len(rows) == STEPS, rows
        # A pretrained model starts far below a random one's ln(49152) = 10.8 per token.
        assert all(0.0 < m["loss"] < 5.0 for m in rows), (cot, rows)
        assert (_latest(out[f"sft_{cot}"]) / "tokenizer").is_dir()


def test_ppo_scores_real_rollouts_in_the_sandbox_and_evaluates(runs):
    out, _ = runs
    rows = _metrics(out["ppo"])
    assert [m["step"] for m in rows] == list(range(1, STEPS + 1))
    for m in rows:
        assert 0.0 <= m["reward_mean"] <= 1.0 and m["response_length"] > 0
        assert m["grad_norm"] > 0 and m["kl"] is not None
    assert rows[-1]["eval_accuracy"] is not None and 0.0 <= rows[-1]["eval_accuracy"] <= 1.0
    state = json.loads((_latest(out["ppo"]) / "trainer_state.json").read_text())
    assert state["job"] == "ppo" and state["step"] == STEPS


def test_eval_scores_every_ncot_test_item(runs):
    out, logs = runs
    summary = json.loads(next(line for line in logs["eval_ncot"].splitlines() if line.startswith("{")))
    assert summary["n"] == TEST_ITEMS and 0.0 <= summary["accuracy"] <= 1.0
    predictions = [json.loads(x) for x in Path(summary["predictions"]).read_text().splitlines()]
    assert all(p["status"] for p in predictions) and len(predictions) == TEST_ITEMS


def test_export_loads_in_transformers_and_generates(runs):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = runs
    export = out["export"]
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    model = AutoModelForCausalLM.from_pretrained(str(export)).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert tokenizer.eos_token_id == EOS_ID and len(tokenizer) == 49152
    ids = tokenizer("Question:\nhow many apples are 3 apples and 4 apples ?\nAnswer reasoning:\n",
                    add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                                   do_sample=False, pad_token_id=EOS_ID)
    assert generated.shape[1] > ids.shape[1]
    assert isinstance(tokenizer.decode(generated[0, ids.shape[1]:]), str)
    head = load_file(str(export / "value_head.safetensors"))
    assert head["weight"].shape == (1, 576) and head["bias"].shape == (1,)
    assert torch.isfinite(head["weight"]).all()


@pytest.mark.parametrize("name,job", [("smollm2-135m_svamp_sft.yaml", "sft"), ("smollm2-135m_svamp_ppo.yaml", "ppo")])
def test_recipes_validate_for_one_gpu(name, job, tmp_path):
    """The example's recipes pass validation (memory plan included) on their one planned GPU,
    and the preset is SmolLM2-135M's architecture (what the converted model.yaml says)."""
    from megatron_reft.config import load_config, resolve_model_config, validate

    stand_in = tmp_path / "data.json"
    stand_in.write_text("[]")
    config = load_config(CONFIGS / name, ["model.load=null", "data.tokenizer=null",
                                          f"data.train_file={stand_in}", f"data.eval_file={stand_in}"])
    model = resolve_model_config(config)
    validate(config, model, job=job, world_size=config.parallel.planned_world_size)
    assert config.parallel.planned_world_size == 1
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.num_query_groups,
            model.ffn_hidden_size, model.vocab_size, model.rope_theta, model.tie_embeddings) == \
        (30, 576, 9, 3, 1536, 49152, 1e5, True)
    assert 134e6 < model.num_parameters() < 136e6
