"""ReFT's reward: 1.0 for a correct final answer, a partial reward for a wrong one that was at
least extracted, 0.0 when nothing could be extracted (reft.md §3).

    scorer = RewardScorer(RewardConfig(cot_type="pcot"))
    results = scorer.score(responses, golds, answer_types)   # list[ScoreResult]
    future = scorer.score_async(responses, golds, answer_types)  # overlap with log-probs
    scorer.close()

Partial reward, by default, only on numeric datasets (the paper); `mcq_partial_reward=True`
reproduces the reference code, which gives it to EVERY non-correct multiple-choice answer - a
wrong letter, no letter, a crashed program (its answer text is never empty there: "none" for a
crash) - so MathQA-MCQ rewards are always 0.1 or 1: the reward hacking the paper reports.
"""
from __future__ import annotations

import concurrent.futures
import math
from dataclasses import dataclass

from .extract import (extract_ncot_answer, extract_program, parse_choice, parse_gold_number,
                      parse_mathqa_options, parse_number)

ANSWER_TYPES = ("number", "choice")


@dataclass
class RewardConfig:
    cot_type: str = "ncot"          # "ncot" (natural language) or "pcot" (Python program)
    partial_reward: float = 0.1     # for an extracted but wrong answer; 0 disables
    tolerance: float = 1e-2         # |pred - gold| <= tolerance counts as correct
    strict_numbers: bool = False    # parse like the reference's float() instead of robustly
    mcq_partial_reward: bool = False  # the reference code's (hackable) MCQ behaviour
    # sandbox, P-CoT only (see sandbox/pool.py:SandboxConfig for what each does)
    timeout_s: float = 2.0
    num_workers: int = 2
    memory_mb: int = 512
    children_per_worker: int = 16
    heavy_workers: int = 1
    fast_path: bool = True          # statically pure programs share a jailed executor
    require_isolation: bool = False

    def __post_init__(self):
        if self.cot_type not in ("ncot", "pcot"):
            raise ValueError(f"reward.cot_type must be 'ncot' or 'pcot', got {self.cot_type!r}")
        if not 0 <= self.partial_reward < 1:
            raise ValueError(f"reward.partial_reward must be in [0, 1), got {self.partial_reward!r}")
        if not self.tolerance >= 0:
            raise ValueError(f"reward.tolerance must be >= 0, got {self.tolerance!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {self.timeout_s!r}")
        if not self.num_workers >= 1:
            raise ValueError(f"reward.num_workers must be >= 1, got {self.num_workers!r}")

    def sandbox_config(self):
        from .sandbox.pool import SandboxConfig
        return SandboxConfig(num_workers=self.num_workers, timeout_s=self.timeout_s,
                             memory_mb=self.memory_mb, heavy_workers=self.heavy_workers,
                             children_per_worker=self.children_per_worker,
                             fast_path_budget_s=0.05 if self.fast_path else 0.0,
                             require_isolation=self.require_isolation)


@dataclass(frozen=True)
class ScoreResult:
    reward: float
    extracted: str | None  # the answer as understood ("72", "0.75", "c"), None if none
    correct: bool
    status: str            # "ok" (an answer was extracted), "none", or the sandbox's status
                           # when the program failed: "timeout", "error:ZeroDivisionError", ...


def reward_for(correct: bool, extracted: bool, answer_type: str, config: RewardConfig) -> float:
    if correct:
        return 1.0
    if answer_type == "choice":
        # The reference's MCQ quirk (reft.md §3): every non-correct answer, extracted or not.
        return config.partial_reward if config.mcq_partial_reward else 0.0
    return config.partial_reward if extracted else 0.0


def no_answer(status: str, answer_type: str, config: RewardConfig) -> ScoreResult:
    """Nothing extracted ("none"), or the program failed (the sandbox's status)."""
    return ScoreResult(reward_for(False, False, answer_type, config), None, False, status)


def judge(answer, gold: str, answer_type: str, config: RewardConfig) -> ScoreResult:
    """Compare an extracted answer (float for numbers, letter for choices, None) with gold."""
    if answer is None:
        return no_answer("none", answer_type, config)
    if answer_type == "choice":
        correct = answer == _gold_letter(gold)
        extracted = answer
    else:
        correct = abs(answer - parse_gold_number(gold)) <= config.tolerance
        extracted = _format_number(answer)
    return ScoreResult(reward_for(correct, True, answer_type, config), extracted, correct, "ok")


def _gold_letter(gold: str) -> str:
    return str(gold).lower().replace('"', "").replace("'", "").strip()


def _format_number(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


class RewardScorer:
    def __init__(self, config: RewardConfig | None = None):
        self.config = config or RewardConfig()
        self._pool = None  # started on the first P-CoT batch
        self._executor = None

    # ---- public API

    def score(self, responses: list[str], golds: list[str], answer_types: list[str],
              questions: list[str] | None = None) -> list[ScoreResult]:
        """One ScoreResult per response. `questions` (optional) lets a P-CoT program that
        returns an option's value instead of its letter be matched on MathQA-MCQ."""
        self._check_lengths(responses, golds, answer_types, questions)
        if not responses:
            return []
        if self.config.cot_type == "ncot":
            return [self._score_ncot(r, g, t) for r, g, t in zip(responses, golds, answer_types)]
        return self._score_pcot(responses, golds, answer_types, questions)

    def score_async(self, responses, golds, answer_types, questions=None
                    ) -> concurrent.futures.Future:
        """score() on a background thread; returns a Future of the same list."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "reward-scorer")
        return self._executor.submit(self.score, list(responses), list(golds),
                                     list(answer_types), None if questions is None else list(questions))

    @property
    def sandbox(self):
        """The sandbox pool (started on first use)."""
        if self._pool is None:
            from .sandbox.pool import SandboxPool
            self._pool = SandboxPool(self.config.sandbox_config())
        return self._pool

    @property
    def isolation_summary(self) -> str | None:
        """The sandbox's one-line description of the isolation in force (None before start)."""
        return self._pool.isolation_summary if self._pool is not None else None

    def close(self):
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the two CoT kinds

    def _score_ncot(self, response: str, gold: str, answer_type: str) -> ScoreResult:
        text = extract_ncot_answer(response)
        if answer_type == "choice":
            answer = parse_choice(text)
        else:
            answer = parse_number(text, strict=self.config.strict_numbers)
            if answer is not None and not self.config.strict_numbers and not math.isfinite(answer):
                answer = None  # "1e999"; strict mode keeps the reference's float() behaviour
        return judge(answer, gold, answer_type, self.config)

    def _score_pcot(self, responses, golds, answer_types, questions) -> list[ScoreResult]:
        programs = [extract_program(r) for r in responses]
        runs = self.sandbox.run(programs)
        results = []
        for i, run in enumerate(runs):
            if run.status != "ok":
                results.append(no_answer(run.status, answer_types[i], self.config))
                continue
            question = questions[i] if questions is not None else None
            answer = self._program_answer(run.value, answer_types[i], question)
            results.append(judge(answer, golds[i], answer_types[i], self.config))
        return results

    def _program_answer(self, value, answer_type: str, question: str | None):
        """solution()'s return value as a number or an option letter (None if it is neither).
        Non-finite numbers (nan, inf) count as no answer."""
        if answer_type == "choice":
            options = parse_mathqa_options(question) if question else None
            if isinstance(value, float):
                value = _format_number(value) if math.isfinite(value) else None
            return parse_choice(value, options, self.config.tolerance)
        if isinstance(value, str):
            value = parse_number(value, strict=self.config.strict_numbers)
        return value if value is not None and math.isfinite(value) else None

    @staticmethod
    def _check_lengths(responses, golds, answer_types, questions):
        n = len(responses)
        if len(golds) != n or len(answer_types) != n or (questions is not None and len(questions) != n):
            raise ValueError(f"score(): {n} responses but {len(golds)} golds, "
                             f"{len(answer_types)} answer_types"
                             + ("" if questions is None else f", {len(questions)} questions"))
        unknown = sorted(set(answer_types) - set(ANSWER_TYPES))
        if unknown:
            raise ValueError(f"score(): unknown answer_type {unknown[0]!r} (use 'number' or 'choice')")
