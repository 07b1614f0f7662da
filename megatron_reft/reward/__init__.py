"""Rewards for ReFT: answer extraction and comparison, and a sandbox for P-CoT programs.

    from megatron_reft.reward import RewardConfig, RewardScorer, ScoreResult

Names are imported lazily so that the sandbox worker, which imports this package, stays small
(every program it runs is a fork of it).
"""
_EXPORTS = {
    "RewardConfig": "score", "RewardScorer": "score", "ScoreResult": "score",
    "judge": "score", "reward_for": "score",
    "answer_type_for": "extract", "parse_mathqa_options": "extract", "parse_number": "extract",
    "parse_choice": "extract", "extract_program": "extract", "extract_ncot_answer": "extract",
    "ANSWER_TRIGGER": "extract",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
