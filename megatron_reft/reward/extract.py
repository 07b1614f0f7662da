"""Getting an answer out of model text: the N-CoT answer line, the P-CoT program, numbers and
multiple-choice letters. Pure functions on strings; reft.md §3 is the specification.

Numbers are parsed robustly by default ("1,000", "$5", "50%", "5.", "-3", "3/4"); with
strict=True they behave exactly like the reference code's float(), which rejects all of these
except "-3" (and accepts "nan", "1e3", "1_000", which the robust parser does not).
"""
from __future__ import annotations

import re

ANSWER_TRIGGER = "Therefore, the answer is:"
CHOICE_LETTERS = "abcde"

_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_RE = re.compile(_NUMBER + r"(?:[eE][-+]?\d+)?")
_GROUPED_RE = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")   # 1,000 / 12,345.5
_FRACTION_RE = re.compile(rf"({_NUMBER})\s*/\s*({_NUMBER})")
_CHOICE_RES = (re.compile(r"\(?([a-e])\)?"),               # c  (c)
                re.compile(r"\(([a-e])\)(?:\s.*)?"),          # (c) 38
                re.compile(r"([a-e])\s*\)(?:\s.*)?"),          # c ) 38   c)
                re.compile(r"([a-e])[.:,](?:\s.*)?"))          # c.   c: 38
_OPTION_RE = re.compile(r"(?:^|,)\s*([a-e])\s*\)\s*(.*?)\s*(?=,\s*[a-e]\s*\)|$)")
_LIST_ELEMENT_RE = re.compile(r"'([^']*)'")
_QUOTES = "\"'`"


def extract_ncot_answer(text: str) -> str | None:
    """The text after the LAST answer trigger, or None when the trigger is absent."""
    position = text.rfind(ANSWER_TRIGGER)
    if position < 0:
        return None
    return text[position + len(ANSWER_TRIGGER):]


def extract_program(response: str) -> str:
    """The reference's rule: the program up to its first blank line. The model keeps writing
    after `return result` (another question, prose); the blank line ends the function."""
    lines = []
    for line in response.strip().split("\n"):
        if line.startswith("def solution"):
            lines.append(line)
            continue
        if not line.strip():
            break
        lines.append(line)
    return "\n".join(lines)


def parse_number(text, strict: bool = False) -> float | None:
    """A number from answer text, or None. See the module docstring for the two modes."""
    if text is None:
        return None
    if strict:
        try:
            return float(text.strip())
        except (TypeError, ValueError):
            return None
    candidate = _normalise_number_text(str(text))
    if _GROUPED_RE.fullmatch(candidate):
        candidate = candidate.replace(",", "")
    if _PLAIN_RE.fullmatch(candidate):
        return float(candidate)
    fraction = _FRACTION_RE.fullmatch(candidate)
    if fraction:
        numerator, denominator = float(fraction.group(1)), float(fraction.group(2))
        return numerator / denominator if denominator else None
    return None


def _normalise_number_text(text: str) -> str:
    """First line only, wrapping removed: '$1,000.' -> '1,000', '-$5' -> '-5', '50 %' -> '50',
    '**42**' -> '42'."""
    line = text.strip().split("\n", 1)[0].replace("\u2212", "-")
    previous = None
    while line != previous:  # peel wrappers in any order: "<203>." / "'5%'"
        previous = line
        line = line.strip().strip(_QUOTES + "*<>").rstrip(".").removesuffix("%")
    sign = ""
    if line[:1] in "+-":
        sign, line = line[:1], line[1:].lstrip()
    line = line.removeprefix("$").lstrip()
    if line[:1] in "+-" and not sign:
        sign, line = line[:1], line[1:]
    return sign + line


def parse_gold_number(gold: str) -> float:
    """Gold answers are trusted data: the reference strips commas and calls float()."""
    try:
        return float(str(gold).replace(",", "").strip())
    except ValueError:
        value = parse_number(gold)
        if value is None:
            raise ValueError(f"gold answer {gold!r} is not a number") from None
        return value


def parse_choice(text, options: dict | None = None, tolerance: float = 1e-2) -> str | None:
    """A MathQA option letter from answer text ('c', '(c)', 'c )', 'C ) 38', "'c'"), or None.
    With the question's options, an answer given as an option's value ('38') maps to its
    letter - how a P-CoT program that returns a number is turned into a choice."""
    if text is None:
        return None
    line = str(text).strip().split("\n", 1)[0].strip().lower()
    line = line.replace('"', "").replace("'", "").strip()
    for pattern in _CHOICE_RES:  # never "a total of 38": a bare letter must stand alone
        match = pattern.fullmatch(line)
        if match:
            return match.group(1)
    if options:
        return _choice_by_value(line, options, tolerance)
    return None


def _choice_by_value(answer: str, options: dict, tolerance: float) -> str | None:
    """The option whose text equals the answer, or whose number is nearest to it (within
    `tolerance`, the same rule as numeric answers)."""
    number = parse_number(answer)
    if number is None:
        matches = [k for k, v in options.items() if answer and answer == v.strip().lower()]
        return matches[0] if matches else None
    distances = {letter: abs(value - number) for letter, value in
                 ((k, parse_number(v)) for k, v in options.items()) if value is not None}
    nearest = min(distances, key=distances.get, default=None)
    return nearest if nearest is not None and distances[nearest] <= tolerance else None


def parse_mathqa_options(question: str) -> dict[str, str]:
    """MathQA's inline options, 'a ) 38 , b ) 27.675 , ... , e ) none of these', as
    {'a': '38', 'b': '27.675', ...}; {} when the question has none. The options are the last
    line of the question; a few items write them as a Python list, "['a ) 12', 'b ) 15', ...]"."""
    last_line = question.strip().rsplit("\n", 1)[-1].strip()
    if last_line.startswith("[") and last_line.endswith("]"):
        elements = _LIST_ELEMENT_RE.findall(last_line)
        last_line = " , ".join(elements)
    options = {}
    for letter, text in _OPTION_RE.findall(last_line):
        options[letter] = re.sub(rf"^{letter}\s*\)\s*", "", text)  # "a ) a ) 4 inches"
    return options


def answer_type_for(item_id: str) -> str:
    """'choice' for MathQA multiple choice ('mathqa_12'), 'number' for everything else,
    including 'mathqa-numeric_12' (its prefix also starts with 'mathqa')."""
    return "choice" if str(item_id).split("_", 1)[0] == "mathqa" else "number"
