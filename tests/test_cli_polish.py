"""`--version`, `report` on a run directory without metrics, the known-warnings filter and
`--verbose`, and the time-bounded progress bar."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from megatron_reft import quiet
from megatron_reft.config import load_config
from megatron_reft.tracking import MetricsLogger

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
ENV.pop("PYTHONWARNINGS", None)


def _cli(*args, env=ENV):
    return subprocess.run([sys.executable, "-m", "megatron_reft.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_version():
    import megatron_reft

    proc = _cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"megatron-reft {megatron_reft.__version__} (megatron-core 0.16.1)"


def test_report_refuses_missing_and_empty_run_dirs(tmp_path):
    (tmp_path / "empty").mkdir()
    for run_dir, problem in ((tmp_path / "nope", "no such run directory"),
                             (tmp_path / "empty", "no metrics (metrics.jsonl is missing or empty")):
        proc = _cli("report", str(run_dir), "--out", str(tmp_path / "report"))
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and problem in proc.stderr
    assert not (tmp_path / "report").exists()


def test_known_warnings_are_filtered_unless_verbose(monkeypatch):
    monkeypatch.delenv(quiet.VERBOSE_ENV, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.filter_known_warnings()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("something else", UserWarning)
    assert [str(w.message) for w in seen] == ["something else"]


def test_megatron_import_is_quiet_by_default_and_verbose_shows_it():
    code = "from megatron_reft import quiet; quiet.filter_known_warnings(); import megatron.core.optimizer"
    quiet_run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=120)
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(ENV, MEGATRON_REFT_VERBOSE="1"))
    assert quiet_run.returncode == 0 and loud.returncode == 0
    assert "Apex are not installed" not in quiet_run.stderr
    assert "Apex are not installed" in loud.stderr


def test_time_bounded_stage_shows_a_time_bar(tmp_path, capsys):
    config = load_config(None, [f"trainer.output_dir={tmp_path}", "trainer.max_seconds=30",
                                "trainer.tensorboard=false"])
    logger = MetricsLogger(config, total_steps=100000, start_step=0, desc="sft")
    logger.log({"step": 7, "loss": 1.5})
    logger.close(final_checkpoint=tmp_path / "checkpoints/step_7")
    captured = capsys.readouterr()
    bar = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert "sft (time-bounded)" in bar and "/30 s, step=7, loss=1.5" in bar and "100000" not in bar
    assert captured.out.strip() == (f"done: final checkpoint {tmp_path}/checkpoints/step_7, "
                                    f"metrics {tmp_path}/metrics.jsonl")
