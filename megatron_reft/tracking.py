"""Experiment tracking for sft/ppo jobs, on global rank 0: metrics.jsonl, TensorBoard (tags grouped
train/, rollout/, timing/, eval/, system/), Weights & Biases (optional), rollout samples
(samples.jsonl + TensorBoard text + a W&B table), system figures (peak memory, tokens/s per
device, MFU where the accelerator's peak is known) and the console progress bar.

Trainers call `MetricsLogger.log(metrics)` once per step with flat keys (`loss`, `time_update`,
`eval_accuracy`); the grouping into tags happens here, so metrics.jsonl keeps the flat keys the
report and the tests read.
"""
from __future__ import annotations

import json
import resource
import secrets
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_reft.reliability.storage import append_whole_lines, write_text_durably

# Keys a PPO step reports about the rollout it trained on (everything else is train/).
ROLLOUT_KEYS = {"reward_mean", "accuracy", "response_length", "kl", "kl_per_token", "entropy"}
SYSTEM_KEYS = {"tokens_per_s", "tokens_per_s_per_device", "peak_memory_gib", "mfu"}
# Dense bf16 peak FLOP/s per device (vendor datasheets), matched against the CUDA device name.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
              "A10G": 70e12, "V100": 125e12}
SAMPLES_FILE = "samples.jsonl"
WANDB_ID_FILE = "wandb_run_id"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def tag_for(key: str) -> str:
    """The TensorBoard / W&B name of a flat metric key."""
    if key.startswith("time_"):
        return "timing/" + key[len("time_"):]
    if key == "step_time":
        return "timing/step"
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    if key in ROLLOUT_KEYS:
        return "rollout/" + key
    if key in SYSTEM_KEYS:
        return "system/" + key
    return "train/" + key


def peak_memory_gib() -> float:
    """Peak accelerator memory of this process (CUDA), else its peak resident set size (CPU)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def device_peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def system_metrics(metrics: dict, train_flops_per_token: float | None) -> dict:
    """tokens/s per device, peak memory, and (training tokens only) model-FLOPs utilisation:
    6·N FLOPs per trained token (forward + backward) over the device's peak."""
    out = {"peak_memory_gib": round(peak_memory_gib(), 4)}
    if "tokens_per_s" in metrics:
        per_device = metrics["tokens_per_s"] / _world()
        out["tokens_per_s_per_device"] = per_device
        peak = device_peak_flops()
        if peak and train_flops_per_token:
            out["mfu"] = per_device * train_flops_per_token / peak
    return out


class MetricsLogger:
    """One per job. `log_interval` (trainer.log_interval) thins the per-step records; a step with
    evaluation results and the last step are always logged."""

    def __init__(self, config, total_steps: int, start_step: int, desc: str,
                 train_flops_per_token: float | None = None):
        self.active = _rank() == 0
        self.out = Path(config.trainer.output_dir)
        self.interval = max(1, int(config.trainer.log_interval))
        self.total_steps = total_steps
        self.flops_per_token = train_flops_per_token
        self.writer = self.bar = self.wandb = None
        # trainer.max_seconds: the bar measures time, the bound that ends the stage (not steps)
        self.time_bound = config.trainer.max_seconds
        self.started = time.perf_counter()
        if not self.active:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "metrics.jsonl"
        self.samples_path = self.out / SAMPLES_FILE
        for path in (self.path, self.samples_path):
            _truncate_after(path, start_step)
        if config.trainer.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        if config.trainer.wandb_project:
            self.wandb = start_wandb(config, desc)
        if config.trainer.progress_bar:
            self.bar = _progress_bar(desc, total_steps, start_step, self.time_bound)

    def due(self, metrics: dict) -> bool:
        step = metrics["step"]
        has_eval = any(k.startswith("eval_") and v is not None for k, v in metrics.items())
        return step % self.interval == 0 or step >= self.total_steps or has_eval

    def log(self, metrics: dict) -> None:
        if not self.active:
            return
        metrics = {k: (float(v) if torch.is_tensor(v) else v) for k, v in metrics.items()}
        self._update_bar(metrics)
        if not self.due(metrics):
            return
        metrics.update(system_metrics(metrics, self.flops_per_token))
        append_whole_lines(self.path, json.dumps(metrics) + "\n")  # disk full: nothing torn
        scalars = {tag_for(k): v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, metrics["step"])
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=metrics["step"])

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """A few rollouts ({prompt, response, reward, extracted, ...}) as JSONL, TB text, W&B table."""
        if not self.active or not samples:
            return
        append_whole_lines(self.samples_path, "".join(json.dumps({"step": step, **sample}) + "\n"
                                                      for sample in samples))
        if self.writer is not None:
            self.writer.add_text("rollout/samples", samples_markdown(samples), step)
            self.writer.flush()
        if self.wandb is not None:
            import wandb

            columns = list(samples[0])
            table = wandb.Table(columns=["step"] + columns,
                                data=[[step] + [s.get(c) for c in columns] for s in samples])
            self.wandb.log({"rollout/samples": table}, step=step)

    def _update_bar(self, metrics: dict) -> None:
        if self.bar is None:
            return
        shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "reward_mean", "accuracy", "eval_loss", "kl")
                 if k in metrics}
        if self.time_bound:
            self.bar.n = min(time.perf_counter() - self.started, self.time_bound)
            shown = {"step": metrics["step"], **shown}
        else:
            self.bar.n = metrics["step"]
        self.bar.set_postfix(shown, refresh=True)

    def close(self, final_checkpoint: str | Path | None = None) -> None:
        """Close every sink; then one line naming what the job produced."""
        if self.bar is not None:
            if self.time_bound:  # the stage's real end (after the last save), not the last log
                self.bar.n = min(time.perf_counter() - self.started, self.time_bound)
                self.bar.refresh()
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            log_plots_to_wandb(self.wandb, self.out)
            self.wandb.finish()
        if self.active and final_checkpoint is not None:
            print(f"done: final checkpoint {final_checkpoint}, metrics {self.path}", flush=True)


def _progress_bar(desc: str, total_steps: int, start_step: int, time_bound: float | None):
    from tqdm import tqdm

    if time_bound:
        return tqdm(total=float(time_bound), desc=f"{desc} (time-bounded)", file=sys.stderr, dynamic_ncols=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}")
    return tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, file=sys.stderr)


def samples_markdown(samples: list[dict]) -> str:
    """A markdown table TensorBoard renders (cells escaped, newlines kept as <br>)."""
    columns = list(samples[0])

    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(s.get(c)) for c in columns) + " |" for s in samples]
    return "\n".join(lines)


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again), and a
    torn line a crash may have left. Rewritten atomically, and only if something changes: a
    full disk at start-up must not cost the metrics logged so far."""
    if not path.is_file():
        return
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = [line if line.endswith("\n") else line + "\n" for line in lines if _logged_up_to(line, step)]
    if kept != lines:
        write_text_durably(path, "".join(kept))


def _logged_up_to(line: str, step: int) -> bool:
    try:
        return json.loads(line).get("step", 0) <= step
    except ValueError:  # not a whole JSON line: an interrupted write
        return False


# ---------------------------------------------------------------- Weights & Biases
def start_wandb(config, job: str):
    """wandb.init with the run id kept in <output_dir>/wandb_run_id, so a resumed (requeued) job
    continues the same W&B run. Mode, entity, API key: wandb's own environment variables
    (WANDB_MODE=offline writes under <output_dir>/wandb/ for a later `wandb sync`)."""
    import wandb  # validate() checked it is installed

    from megatron_reft.config import to_dict

    out = Path(config.trainer.output_dir)
    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
    id_file.write_text(run_id + "\n")
    return wandb.init(project=config.trainer.wandb_project, id=run_id, resume="allow", dir=str(out),
                      name=f"{out.name}", job_type=job, config=to_dict(config))


def log_plots_to_wandb(run, out: Path) -> None:
    """The report's curves (the same PNGs `megatron-reft report` makes) as W&B images."""
    from megatron_reft.report import write_report

    try:
        write_report([out], out / "plots")
    except ImportError:  # matplotlib is optional
        return
    import wandb

    images = {f"plots/{png.stem}": wandb.Image(str(png)) for png in sorted((out / "plots").glob("*.png"))}
    if images:
        run.log(images)
