"""The one record schema every loader produces, and the report of what was rejected.

A record is {id, question, cot, answer, choices?} (reft.md §7). `cot` is the N-CoT text (without
the "Therefore, the answer is: ..." ending, which prompts.ncot_target appends) or the full P-CoT
program; it is None for test sets, which only need (question, answer).
"""
import logging
import re
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

MAX_EXAMPLES_PER_REASON = 3


@dataclass
class Record:
    id: str
    question: str
    cot: str | None
    answer: str
    choices: dict[str, str] | None = None
    # Free-form extras that are not part of the schema (the synthetic task keeps both its
    # N-CoT text and its P-CoT program here). Saved to our JSONL only when non-empty.
    meta: dict = field(default_factory=dict)

    @property
    def dataset(self) -> str:
        """Dataset name from the id prefix: "svamp_12" -> "svamp", "mathqa-numeric_0" -> "mathqa-numeric"."""
        return self.id.rsplit("_", 1)[0] if "_" in self.id else self.id

    @property
    def answer_type(self) -> str:
        """"choice" for MathQA multiple choice (letters a-e), else "number" (reft.md §3, §7)."""
        # "mathqa-numeric_..." does not start with "mathqa_", so it is numeric.
        return "choice" if self.id.startswith("mathqa_") else "number"

    def to_json(self) -> dict:
        row = {"id": self.id, "question": self.question, "cot": self.cot, "answer": self.answer}
        if self.choices is not None:
            row["choices"] = dict(self.choices)
        if self.meta:
            row["meta"] = dict(self.meta)
        return row


def parse_number(text: str) -> float | None:
    """A gold answer as a float, or None. Thousands separators are dropped (reft.md §3)."""
    try:
        return float(text.replace(",", "").strip())
    except (ValueError, AttributeError):
        return None


# MathQA options come either inline ("a ) 38 , b ) 27.675 , c ) 30 , ...") or as a Python-list
# string ("['a ) 12', 'b ) 15', ...]"); both sit on the question's last line.
_INLINE_OPTION = re.compile(r"(?:^|\s,\s)([a-e])\s\)\s")
_LIST_OPTION = re.compile(r"'([a-e])\s\)\s(.*?)'(?=,\s'|\]$)")


def parse_choices(question: str) -> dict[str, str] | None:
    """Options a-e parsed from the last line of a MathQA question, or None if there are none."""
    last_line = question.strip().split("\n")[-1].strip()
    if last_line.startswith("["):
        pairs = [(m.group(1), m.group(2)) for m in _LIST_OPTION.finditer(last_line)]
    else:
        starts = list(_INLINE_OPTION.finditer(last_line))
        ends = [m.start() for m in starts[1:]] + [len(last_line)]
        pairs = [(m.group(1), last_line[m.end():end]) for m, end in zip(starts, ends)]
    letters = [letter for letter, _ in pairs]
    if not pairs or letters != sorted(set(letters)):
        return None
    # A few options repeat their own label ("b ) b ) 6 inches"); drop the repeat.
    return {letter: re.sub(rf"^{letter}\s\)\s", "", value.strip()).strip() for letter, value in pairs}


class MalformedRecordError(ValueError):
    """Raised under on_malformed="raise"; the message names the file, the record index and the reason."""


@dataclass
class LoadReport:
    """What a load (or a length check) kept and what it rejected, by reason, with a few examples.

    Malformed records are never dropped silently: under on_malformed="report" they are skipped
    and counted here (and a warning is logged); under "raise" the first one raises.
    """
    source: str
    fmt: str = ""
    loaded: int = 0
    malformed: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    truncated: int = 0  # kept, but cut to a length limit (data.overlong_prompts=truncate)

    @property
    def num_malformed(self) -> int:
        return sum(self.malformed.values())

    def reject(self, index: int, reason: str, detail: str, on_malformed: str) -> None:
        """Count one bad record, or raise if the policy says so."""
        message = f"{self.source}: record {index}: {reason}: {detail}"
        if on_malformed == "raise":
            raise MalformedRecordError(message)
        self.malformed[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < MAX_EXAMPLES_PER_REASON:
            shown.append(f"record {index}: {detail}")

    def truncate(self, index: int, detail: str) -> None:
        """Count one record kept but cut to the length limit."""
        self.truncated += 1
        shown = self.examples.setdefault("truncated", [])
        if len(shown) < MAX_EXAMPLES_PER_REASON:
            shown.append(f"record {index}: {detail}")

    def warn_if_malformed(self) -> None:
        if self.num_malformed or self.truncated:
            logger.warning(str(self))

    def __str__(self) -> str:
        text = f"{self.source} ({self.fmt or 'unknown format'}): {self.loaded} records kept"
        if self.truncated:
            text += f" ({self.truncated} of them truncated)"
        if self.num_malformed:
            reasons = ", ".join(f"{reason} {count}" for reason, count in self.malformed.most_common())
            text += f", {self.num_malformed} rejected ({reasons})."
        else:
            text += ", none rejected."
        for reason, shown in self.examples.items():
            text += f" {reason}, e.g. " + "; ".join(shown) + "."
        return text


def check_policy(on_malformed: str) -> None:
    if on_malformed not in ("report", "raise"):
        raise ValueError(f"on_malformed must be 'report' or 'raise', got {on_malformed!r}")
