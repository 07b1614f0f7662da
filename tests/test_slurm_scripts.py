"""The sbatch scripts' shell logic without a cluster: slurm/common.sh functions run in bash on
fixtures (time strings, "is the run finished?", checkpoint arguments, argument parsing, run
directory names). The cluster tests (test_slurm.py) cover the same code end to end."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[1] / "slurm" / "common.sh"


def bash(script: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `script` after sourcing common.sh; stdout stripped."""
    result = subprocess.run(["bash", "-c", f'. "{COMMON}"\n{script}'], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", **(env or {})}, timeout=30)
    result.stdout = result.stdout.strip()
    return result


@pytest.mark.parametrize("text, seconds", [("1-00:00:00", "86400"), ("23:59:59", "86399"), ("05:03", "303"),
                                           ("UNLIMITED", ""), ("NOT_SET", ""), ("", "")])
def test_slurm_time_strings(text, seconds):
    assert bash(f'reft_seconds "{text}"').stdout == seconds


def _run_dir(tmp_path: Path, max_steps, epochs: int, logged: list[tuple[int, float]]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    # The shape the trainer writes (yaml.safe_dump of the config, sort_keys=False).
    (run / "config.yaml").write_text("model:\n  preset: tiny-llama\ntrainer:\n  output_dir: x\n"
                                     f"  epochs: {epochs}\n  max_steps: {'null' if max_steps is None else max_steps}\n"
                                     "ppo:\n  max_steps: 999\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "epoch": e, "loss": 1.0}) + "\n"
                                               for s, e in logged))
    return run


@pytest.mark.parametrize("max_steps, epochs, logged, complete", [
    (4, 2, [(3, 0.75), (4, 1.0)], True),  # max_steps reached
    (4, 2, [(1, 0.25), (2, 0.5)], False),  # stopped early (time budget)
    (None, 2, [(15, 1.875), (16, 2.0)], True),  # all epochs
    (None, 2, [(8, 1.0)], False),  # one epoch of two
    (None, 2, [], False),  # nothing logged yet
])
def test_run_complete_reads_the_trainers_config_and_metrics(tmp_path, max_steps, epochs, logged, complete):
    run = _run_dir(tmp_path, max_steps, epochs, logged)
    result = bash("reft_run_complete", env={"RUN_DIR": str(run)})
    assert (result.returncode == 0) == complete, result.stderr


def test_checkpoint_arguments_resolve_to_the_latest_checkpoint(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_7").mkdir(parents=True)
    (ckpts / "latest").write_text("step_7\n")
    for given in (tmp_path / "run", ckpts, ckpts / "step_7"):
        assert bash(f'reft_resolve_checkpoint "{given}"').stdout == str(ckpts / "step_7")


def test_arguments_split_into_config_overrides_and_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    result = bash(f'REFT_NEEDS_CONFIG=1; cd "{tmp_path}"\n'
                  'reft_parse_args c.yaml a.b=1 --ckpt /x --out=/y c.d=two a.b=3\n'
                  'reft_set_override c.d three\n'
                  'echo "$REFT_CONFIG|${REFT_OVERRIDES[*]}|${REFT_FLAGS[*]}|$(reft_override a.b)"')
    assert result.stdout == f"{config}|a.b=1 a.b=3 c.d=three|--ckpt /x --out=/y|3"
    missing = bash(f'REFT_NEEDS_CONFIG=1; REFT_SCRIPT=slurm/sft.sh; cd "{tmp_path}"; reft_parse_args nope.yaml')
    assert missing.returncode == 2 and "config file not found: nope.yaml" in missing.stderr


@pytest.mark.parametrize("job_name, config, kind, expected", [
    ("sft.sh", "configs/tiny_cpu.yaml", "sft", "tiny_cpu-sft-42"),
    ("sft.sh", "configs/codellama-7b_gsm8k_ncot_sft.yaml", "sft", "codellama-7b_gsm8k_ncot_sft-42"),
    ("gsm8k-try3", "configs/tiny_cpu.yaml", "ppo", "gsm8k-try3-42"),
])
def test_run_directory_names(tmp_path, job_name, config, kind, expected):
    result = bash(f'cd "{tmp_path}"; REFT_SCRIPT=slurm/{kind}.sh REFT_KIND={kind} REFT_NEEDS_CONFIG=1 '
                  f'REFT_CONFIG=/repo/{config} REFT_OVERRIDES=()\n'
                  'reft_pick_run_dir; echo "$RUN_DIR|${REFT_OVERRIDES[*]}"',
                  env={"SLURM_JOB_ID": "42", "SLURM_JOB_NAME": job_name, "RUNS_ROOT": str(tmp_path / "runs")})
    run_dir = tmp_path / "runs" / expected
    assert result.stdout == f"{run_dir}|trainer.output_dir={run_dir}", result.stderr
    assert (run_dir / "logs" / "job42.0").is_dir() and (run_dir / "logs" / "latest").is_symlink()
    # RUN_DIR (a resubmission into an earlier run) wins over the derived name.
    again = bash(f'cd "{tmp_path}"; REFT_SCRIPT=slurm/{kind}.sh REFT_KIND={kind} REFT_NEEDS_CONFIG=1 '
                 'REFT_CONFIG=/repo/c.yaml REFT_OVERRIDES=(); reft_pick_run_dir; echo "$RUN_DIR"',
                 env={"SLURM_JOB_ID": "43", "RUN_DIR": str(run_dir)})
    assert again.stdout == str(run_dir) and (run_dir / "logs" / "job43.0").is_dir()


# ---------------------------------------------------------------- the baselines' scripts (issue 13)
def _dry_launch(tmp_path: Path, script: str, args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run slurm/<script> up to the point where it would start ranks: REFT_HOME points at a stub
    common.sh that sources the real one and replaces reft_launch by "parse, pick the run
    directory, prepare, print what would run"."""
    stub = tmp_path / "home" / "slurm"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "common.sh").write_text(
        f'. "{COMMON}"\n'
        'reft_launch() {\n  reft_parse_args "$@"; reft_pick_run_dir >/dev/null\n'
        '  [ -n "${REFT_PREPARE:-}" ] && "$REFT_PREPARE" >/dev/null\n'
        '  echo "$REFT_KIND|$REFT_PLAN_JOB|${REFT_COMMAND[*]}|${REFT_FLAGS[*]}|${REFT_OVERRIDES[*]}"\n'
        '  reft_is_training_kind && echo training || echo finishes-when-done\n}\n')
    script_path = COMMON.parent / script
    return subprocess.run(["bash", "-c", f'cd "{tmp_path}"; bash "{script_path}" {args}'], capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "REFT_HOME": str(tmp_path / "home"),
                                                      "SLURM_JOB_ID": "42", "SLURM_JOB_NAME": script,
                                                      "RUNS_ROOT": str(tmp_path / "runs"), **(env or {})})


def _sft_run(tmp_path: Path) -> Path:
    ckpts = tmp_path / "sft_run" / "checkpoints"
    (ckpts / "step_9").mkdir(parents=True)
    (ckpts / "latest").write_text("step_9\n")
    (tmp_path / "c.yaml").write_text("{}\n")
    return ckpts.parent


@pytest.mark.parametrize("script, kind, plan, command", [
    ("online_st.sh", "online-st", "ppo", "online-st"),
    ("train_rm.sh", "rm", "sft", "train-rm"),
])
def test_online_st_and_reward_model_scripts_resolve_a_run_directory_as_model_load(tmp_path, script, kind, plan,
                                                                                   command):
    from megatron_reft.cli import COMMANDS

    sft = _sft_run(tmp_path)
    result = _dry_launch(tmp_path, script, f"c.yaml model.load={sft} --samples-dir s")
    assert result.returncode == 0, result.stderr
    line, mode = result.stdout.splitlines()[-2:]
    run_dir = tmp_path / "runs" / f"c-{kind}-42"
    assert line == (f"{kind}|{plan}|{command}|--samples-dir s|trainer.output_dir={run_dir} "
                    f"model.load={sft}/checkpoints/step_9")
    assert command in COMMANDS and mode == "training"  # finished = reached trainer.epochs (reft_run_complete)


def test_offline_st_data_script_takes_the_checkpoint_and_writes_into_its_run_directory(tmp_path):
    sft = _sft_run(tmp_path)
    result = _dry_launch(tmp_path, "offline_st_data.sh", "c.yaml --samples 100", env={"CKPT": str(sft)})
    assert result.returncode == 0, result.stderr
    line, mode = result.stdout.splitlines()[-2:]
    run_dir = tmp_path / "runs" / "c-offline-st-data-42"
    ckpt = f"{sft}/checkpoints/step_9"
    assert line == (f"offline-st-data|eval|offline-st-data|--samples 100 --ckpt {ckpt} --out {run_dir}/train.jsonl|"
                    f"trainer.output_dir={run_dir} model.load={ckpt}")
    assert mode == "finishes-when-done"  # no metrics.jsonl: a requeue resumes from the sample store
    given_out = _dry_launch(tmp_path, "offline_st_data.sh", f"c.yaml --ckpt {sft} --out x.jsonl")
    assert f"--out x.jsonl --ckpt {ckpt}|" in given_out.stdout
    missing = _dry_launch(tmp_path, "offline_st_data.sh", "c.yaml")
    assert missing.returncode == 2 and "needs the warm-up checkpoint" in missing.stderr


def test_every_sbatch_script_parses_and_runs_a_real_command():
    from megatron_reft.cli import COMMANDS

    for script in sorted(COMMON.parent.glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0, script
        text = script.read_text()
        if script.name != "common.sh":
            command = text.split("REFT_COMMAND=(", 1)[1].split(")", 1)[0].split()[0]
            assert command in COMMANDS, (script.name, command)
