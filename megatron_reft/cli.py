"""One entry point: `megatron-reft <command> ...`.

Each command lives in its own module exposing `main(argv)`; importing lazily keeps
`megatron-reft score` free of torch/megatron start-up cost.
"""
import importlib
import sys

COMMANDS = {
    "sft": ("megatron_reft.sft.trainer", "warm-up supervised fine-tuning"),
    "ppo": ("megatron_reft.rl.trainer", "ReFT PPO"),
    "online-st": ("megatron_reft.rl.online_st", "online self-training baseline (reft.md §6)"),
    "eval": ("megatron_reft.evaluation.run", "greedy accuracy of a checkpoint on a test file"),
    "offline-st-data": ("megatron_reft.evaluation.offline_st", "offline self-training data: k samples per train question"),
    "train-rm": ("megatron_reft.evaluation.train_rm", "reward model (correct/incorrect classifier) for reranking"),
    "score": ("megatron_reft.reward.cli", "score gold CoTs or model responses against answers"),
    "convert": ("megatron_reft.checkpoint.cli", "Hugging Face <-> Megatron checkpoint conversion"),
    "demo": ("megatron_reft.demo", "CPU quickstart: synthetic task -> SFT -> PPO -> eval"),
    "experiment": ("megatron_reft.experiment.cli", "Tables 1 and 2 of the paper from run directories (--run: run the missing jobs)"),
    "report": ("megatron_reft.report", "plots and a markdown report from a run directory"),
    "data": ("megatron_reft.data.prepare", "check or prepare the paper recipes' data files (docs/data.md)"),
    "plan": ("megatron_reft.planning", "per-GPU memory plan for a config"),
}


def usage() -> str:
    lines = ["usage: megatron-reft [--version] [-v|--verbose] <command> [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "-v/--verbose: show library warnings that are filtered by default (megatron_reft/quiet.py)"]
    return "\n".join(lines)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from megatron_reft import __version__

    try:
        mcore = dist_version("megatron-core")
    except PackageNotFoundError:
        mcore = "not installed"
    return f"megatron-reft {__version__} (megatron-core {mcore})"


def main(argv=None) -> int:
    import os

    from megatron_reft import quiet

    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0] in ("-v", "--verbose"):
        os.environ[quiet.VERBOSE_ENV] = "1"  # inherited by spawned ranks and sandbox workers
        argv = argv[1:]
    if argv and argv[0] == "--version":
        print(version())
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    quiet.filter_known_warnings()
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"megatron-reft: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
