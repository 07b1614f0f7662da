"""Prompt and target strings, and their tokenization with the prompt masked out (reft.md §2).

    prompt        "Question:\n" + question.strip() + "\nAnswer reasoning:\n"        (no BOS)
    N-CoT target  cot.strip() + "\nTherefore, the answer is: " + answer                (+ EOS)
    P-CoT target  the program "def solution():\n    \"\"\"<question>\"\"\"\n ... return result"  (+ EOS)

SFT tokenizes prompt and target separately and concatenates the ids (as the reference does).
The RL prompt's ids are built the same way - prompt ids, then for P-CoT the ids a program starting
with the header is tokenized into, up to the last token that lies wholly inside the header - so
that they are exactly the first ids of the SFT sequence: the policy continues from a token
boundary SFT showed it (reft.md §2, "watch the tokenizer boundary at that seam"; docs/data.md,
"Tokenizer seams").
"""
import functools
from dataclasses import dataclass

from megatron_reft.data.records import LoadReport, Record, check_policy

INSTRUCTION = "Question:\n"
COT_TRIGGER = "\nAnswer reasoning:\n"
ANSWER_TRIGGER = "\nTherefore, the answer is: "
PROGRAM_HEADER = "def solution():\n"
COT_TYPES = ("ncot", "pcot")
OVERLONG_PROMPT_POLICIES = ("drop", "truncate")


def check_cot_type(cot_type: str) -> None:
    if cot_type not in COT_TYPES:
        raise ValueError(f"cot_type must be one of {COT_TYPES}, got {cot_type!r}")


def build_prompt(question: str) -> str:
    return INSTRUCTION + question.strip() + COT_TRIGGER


def ncot_target(cot: str, answer: str) -> str:
    # The reference appends the trigger to every N-CoT, even though the released SVAMP CoTs
    # already end with their own "Therefore, the answer is <203>." sentence: the target then
    # carries both, and we keep that so targets match the reference token for token.
    return cot.strip() + ANSWER_TRIGGER + answer.strip()


def pcot_prefill(question: str) -> str:
    """The program header the RL prompt is pre-filled with (reft.md §2) as text: up to the
    docstring's closing quotes, the newline after them left to the policy (as the reference
    code does). Its ids, and the part of it they spell, come from encode_pcot_prefill."""
    return PROGRAM_HEADER + '    """' + question.strip() + '"""'


def encode_pcot_prefill(tokenizer, question: str) -> tuple[list[int], str]:
    """(ids, text): the ids a P-CoT program opening with the header is tokenized into, up to the
    last id that lies wholly inside the header, and the header text those ids spell.

    Why cut there rather than encode the header (with its newline) on its own: tokens can cross
    the header's end in SFT's targets - a byte-level BPE (Galactica, OPT, SmolLM2) merges the
    newline with the next line's indentation (`"\n   "` + `" num"`), a SentencePiece model may
    hold one piece for the closing quotes and the newline - so a prompt ending in the header's
    own last token puts the policy at a boundary SFT never showed it (measured with the old
    prefill: 13 of 20 SmolLM2 programs after a short warm-up were SyntaxErrors). The policy
    writes the rest of the header itself, as it learned to in SFT.
    """
    ids, text = _pcot_prefill_split(tokenizer, question)
    return list(ids), text


@functools.lru_cache(maxsize=65536)
def _pcot_prefill_split(tokenizer, question: str) -> tuple[tuple[int, ...], str]:
    # Cached: the scorer reads the prefill of every response (K up to 100 per question in
    # `eval --samples`), and a question's prefill never changes for a tokenizer object.
    header = pcot_prefill(question)
    ids = tokenizer.encode(header + "\n    ")  # a program's header, newline and indentation
    for n in range(len(ids), 0, -1):
        text = tokenizer.decode(ids[:n])
        if text and header.startswith(text):
            return tuple(ids[:n]), text
    return (), ""


def build_target(record: Record, cot_type: str) -> str:
    check_cot_type(cot_type)
    if record.cot is None:
        raise ValueError(f"record {record.id} has no cot; SFT needs one")
    if cot_type == "ncot":
        return ncot_target(record.cot, record.answer)
    return record.cot.strip()


def build_rl_prompt(record: Record, cot_type: str) -> str:
    """The RL prompt as text (what a text-in engine such as HF generate() is given); its ids
    are encode_rl_prompt's, which tokenizes the two parts apart."""
    check_cot_type(cot_type)
    prompt = build_prompt(record.question)
    return prompt + pcot_prefill(record.question) if cot_type == "pcot" else prompt


def full_program(tokenizer, record: Record, completion: str) -> str:
    """The whole P-CoT program: the header text the RL prompt's prefill spells, then what the
    policy wrote after it (the header's tail, if any, and the body)."""
    return encode_pcot_prefill(tokenizer, record.question)[1] + completion


@dataclass
class SFTExample:
    input_ids: list[int]
    loss_mask: list[int]  # 0 on prompt tokens, 1 on target tokens and the final EOS

    def __len__(self) -> int:
        return len(self.input_ids)


class OverlongError(ValueError):
    """An item longer than the configured limit (reported or raised, never truncated silently)."""


def encode_sft(tokenizer, record: Record, cot_type: str, max_length: int | None = None) -> SFTExample:
    """prompt ids + target ids + EOS, loss only on target and EOS (reft.md §1, §2); no BOS."""
    prompt_ids = tokenizer.encode(build_prompt(record.question))
    target_ids = tokenizer.encode(build_target(record, cot_type)) + [tokenizer.eos_id]
    if max_length is not None and len(prompt_ids) + len(target_ids) > max_length:
        raise OverlongError(f"{len(prompt_ids) + len(target_ids)} tokens > max_length {max_length}")
    return SFTExample(prompt_ids + target_ids, [0] * len(prompt_ids) + [1] * len(target_ids))


def encode_rl_prompt(tokenizer, record: Record, cot_type: str, max_prompt_length: int | None = None) -> list[int]:
    """Prompt ids, plus for P-CoT the prefill's ids (encode_pcot_prefill): the SFT sequence's
    first ids wherever the program's docstring is the question (see the module docstring)."""
    check_cot_type(cot_type)
    ids = tokenizer.encode(build_prompt(record.question))
    if cot_type == "pcot":
        ids = ids + encode_pcot_prefill(tokenizer, record.question)[0]
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        raise OverlongError(f"{len(ids)} prompt tokens > max_prompt_length {max_prompt_length}")
    return ids


def encode_sft_records(tokenizer, records: list[Record], cot_type: str, max_length: int,
                       on_malformed: str = "report", report: LoadReport | None = None
                       ) -> tuple[list[SFTExample], list[Record], LoadReport]:
    """encode_sft over a dataset; over-long items are counted in the report (or raise).

    Returns the examples, the records they came from (same order) and the report.
    """
    check_policy(on_malformed)
    report = report or LoadReport(source="sft-encoding")
    examples, kept = [], []
    for index, record in enumerate(records):
        try:
            examples.append(encode_sft(tokenizer, record, cot_type, max_length))
        except OverlongError as error:
            report.reject(index, "sequence_too_long", f"{record.id}: {error}", on_malformed)
            continue
        kept.append(record)
    report.loaded = len(examples)
    report.warn_if_malformed()
    return examples, kept, report


def encode_rl_prompts(tokenizer, records: list[Record], cot_type: str, max_prompt_length: int,
                      on_malformed: str = "report", report: LoadReport | None = None,
                      overlong: str = "drop") -> tuple[list[list[int]], list[Record], LoadReport]:
    """encode_rl_prompt over a dataset (reference: prompt <= 300 tokens, reft.md §5).

    A prompt over max_prompt_length is dropped (`overlong="drop"`: counted as prompt_too_long,
    or raised under on_malformed="raise") or, as the reference does, truncated to its first
    max_prompt_length tokens (`"truncate"`: kept, counted in report.truncated). A truncated
    P-CoT prompt loses its prefill's tail; the scorer still prepends the whole header.
    """
    check_policy(on_malformed)
    if overlong not in OVERLONG_PROMPT_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_PROMPT_POLICIES}, got {overlong!r}")
    report = report or LoadReport(source="rl-prompt-encoding")
    prompts, kept = [], []
    for index, record in enumerate(records):
        ids = encode_rl_prompt(tokenizer, record, cot_type)
        if len(ids) > max_prompt_length:
            detail = f"{record.id}: {len(ids)} prompt tokens > max_prompt_length {max_prompt_length}"
            if overlong == "drop":
                report.reject(index, "prompt_too_long", detail, on_malformed)
                continue
            report.truncate(index, detail)
            ids = ids[:max_prompt_length]
        prompts.append(ids)
        kept.append(record)
    report.loaded = len(prompts)
    report.warn_if_malformed()
    return prompts, kept, report
