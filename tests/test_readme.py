"""README's "Using it" commands, run as written, in order, in a scratch directory.

The block run is the code block right after the `<!-- readme-test ... -->` marker (other code
blocks in README are not run). Each line is executed with its own arguments; the test only
(1) runs `megatron-reft X` as `python -m megatron_reft.cli X` and `torchrun` as
`python -m torch.distributed.run` with this checkout on PYTHONPATH, (2) skips the venv
activation line (the test already runs inside the environment), and (3) appends
`trainer.max_steps=2` to training commands that do not set a step count themselves.
The scratch directory provides what the commands name: `configs/` (this repo's), a tiny
random llama saved as `CodeLlama-7b-hf/`, and `../shared/data/...` (the real file when present,
else a three-record file in the same schema).
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- readme-test"
TRAINING_COMMANDS = ("sft", "ppo", "online-st", "train-rm")


def readme_commands(readme: Path = REPO / "README.md") -> list[list[str]]:
    """The marked block's commands, continuation lines joined and comments dropped."""
    text = readme.read_text()
    assert MARKER in text, "README.md lost its readme-test marker"
    after = text[text.index(MARKER):]
    start = after.index("```bash\n") + len("```bash\n")
    block = after[start:after.index("```", start)]
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_executed(argv: list[str]) -> list[str] | None:
    """The command line the test runs for one README line (None: the activation line)."""
    if argv[0] in (".", "source"):
        assert argv[1:] == [".venv/bin/activate"], argv
        return None
    if argv[0] == "megatron-reft":
        argv = [sys.executable, "-m", "megatron_reft.cli"] + argv[1:]
    elif argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
    else:
        raise AssertionError(f"README runs an unexpected program: {argv[0]}")
    command = _job_name(argv)
    if command in TRAINING_COMMANDS and not any(a.startswith("trainer.max_steps=") for a in argv):
        argv = argv + ["trainer.max_steps=2"]
    return argv


def _job_name(argv: list[str]) -> str | None:
    if "megatron_reft.cli" in argv:
        return argv[argv.index("megatron_reft.cli") + 1]
    return None


def _prepare_scratch(root: Path) -> Path:
    """root/work is the working directory; root/shared is what `../shared` means there."""
    from conversion_models import random_hf_model, save_hf

    work = root / "work"
    work.mkdir()
    (work / "configs").symlink_to(REPO / "configs")
    save_hf(random_hf_model("llama_gqa"), work / "CodeLlama-7b-hf", tokenizer=True)
    real = REPO.parent / "shared"
    if (real / "data" / "mwp_reft" / "svamp_python_sdp.json").is_file():
        (root / "shared").symlink_to(real)
    else:
        data = root / "shared" / "data" / "mwp_reft"
        data.mkdir(parents=True)
        items = [{"item_id": f"svamp_{i}", "question": q, "answer_cot": f"def solution():\n    return {expr}",
                  "answer_value": value} for i, (q, expr, value) in enumerate(
                     [("Tom has 3 apples and buys 4 more. How many?", "3 + 4", "7.0"),
                      ("Half of 10?", "10 / 2", "5.0"), ("6 times 7?", "6 * 7", "42.0")])]
        (data / "svamp_python_sdp.json").write_text(json.dumps(items))
    return work


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    work = _prepare_scratch(tmp_path_factory.mktemp("readme"))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PET_MASTER_PORT=str(_free_port()))
    outputs = []
    for argv in readme_commands():
        executed = as_executed(argv)
        if executed is None:
            continue
        proc = subprocess.run(executed, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"README command failed: {shlex.join(argv)}\n{proc.stderr[-3000:]}"
        outputs.append((argv, proc))
    return work, env, outputs


def test_parser_reads_the_marked_block_only(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("```bash\nrm -rf /\n```\n<!-- readme-test -->\n```bash\nmegatron-reft sft --config a.yaml \\\n"
                      "    x=1   # comment\n```\n```bash\nnot run\n```\n")
    assert readme_commands(readme) == [["megatron-reft", "sft", "--config", "a.yaml", "x=1"]]


def test_every_readme_command_runs_in_order(readme_run):
    work, _, outputs = readme_run
    ran = [_job_name(as_executed(argv)) for argv, _ in outputs]
    assert ran[:3] == ["sft", "sft", "ppo"] and set(ran) >= {"eval", "score", "convert", "report"}
    assert (work / "runs/tiny_cpu/checkpoints/step_20/model.yaml").is_file()
    # every job ends with one line naming its final checkpoint and metrics file
    assert outputs[0][1].stdout.strip().splitlines()[-1] == (
        "done: final checkpoint runs/tiny_cpu/checkpoints/step_20, metrics runs/tiny_cpu/metrics.jsonl")
    ppo_state = json.loads((work / "runs/tiny_cpu_ppo/checkpoints/step_2/trainer_state.json").read_text())
    assert ppo_state["job"] == "ppo" and ppo_state["reference"] == "runs/tiny_cpu/checkpoints/step_20"
    tp2 = json.loads((work / "runs/tiny_cpu_tp2/checkpoints/step_2/trainer_state.json").read_text())
    assert tp2["job"] == "sft"
    assert (work / "ckpt/codellama7b/model.yaml").is_file()
    assert "![tiny_cpu_ppo]" in (work / "runs/tiny_cpu_ppo/report/report.md").read_text()
    score = next(p for argv, p in outputs if argv[1] == "score")
    assert '"ok"' in score.stdout
    # the tables command (docs/experiment.md): every README run has its number, voting@8 was run by --run
    tables = json.loads((work / "runs/experiment_tiny/tables.json").read_text())
    assert [r["label"] for r in tables["table1"]["rows"]] == ["Tiny SFT", "Tiny Online Self-Training", "Tiny ReFT"]
    assert all(r["cells"]["synthetic/ncot"]["value"] is not None for r in tables["table1"]["rows"])
    assert tables["table2"]["rows"][0]["label"] == "Tiny SFT + Voting@8"
    assert tables["table2"]["rows"][0]["cells"]["synthetic/ncot"]["value"] is not None


def test_ppo_refuses_a_run_dir_holding_sft_checkpoints(readme_run):
    """The pre-fix README sequence: PPO in SFT's run directory. One line, exit 2, nothing written."""
    work, env, _ = readme_run
    config_before = (work / "runs/tiny_cpu/config.yaml").read_text()
    proc = subprocess.run([sys.executable, "-m", "megatron_reft.cli", "ppo", "--config", "configs/tiny_cpu.yaml",
                           "model.load=runs/tiny_cpu/checkpoints/step_20"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    problem = [line for line in proc.stderr.splitlines() if line.strip() and line != "config error:"]
    assert len(problem) == 1 and "holds sft checkpoints (step_20)" in problem[0], proc.stderr
    assert "trainer.output_dir" in problem[0]
    assert (work / "runs/tiny_cpu/config.yaml").read_text() == config_before
