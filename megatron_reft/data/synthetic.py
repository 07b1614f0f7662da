"""A synthetic math word-problem task for the CPU quickstart and the tests.

Each item is a short multi-step story ("Tom has 5 apples. He buys 3 more. He gives 2 away. How
many apples does Tom have now?") with both an N-CoT text and a P-CoT program in the reference
style (reft.md §2; compare ../shared/data/mwp_reft/svamp_python_sdp.json):

    N-CoT  "Tom starts with 5 apples. After buying 3 he has 5 + 3 = 8. After giving 2 away he has 8 - 2 = 6."
    P-CoT  def solution():
               \"\"\"Tom has 5 apples. He buys 3 more. ...\"\"\"
               apples = 5
               bought = 3
               apples = apples + bought
               ...
               result = apples
               return result

The difficulty knob sets the number of steps, the operand and value ranges and the operations.
Small numbers keep the arithmetic learnable by a tiny model. The language is templated and easy
to copy, so what a briefly warmed-up model should still get wrong is the arithmetic (carries,
several steps in a row): errors a correctness reward can fix.
Everything is a pure function of (seed, difficulty): the same call gives the same items.
"""
import io
import os
import random
from dataclasses import dataclass

from megatron_reft.data.prompts import ANSWER_TRIGGER, COT_TRIGGER, INSTRUCTION, PROGRAM_HEADER, \
    build_prompt, check_cot_type, ncot_target
from megatron_reft.data.records import Record
from megatron_reft.data.tokenizer import SENTENCEPIECE_FILE, Tokenizer, load_tokenizer

PEOPLE = (("Tom", "he"), ("Ann", "she"), ("Max", "he"), ("Lily", "she"),
          ("Sam", "he"), ("Mia", "she"), ("Ben", "he"), ("Zoe", "she"))
OBJECTS = ("apples", "coins", "books", "cards", "marbles", "pens", "shells", "stamps")

# op -> [(question sentence, CoT clause before the arithmetic, program variable)], {P} = He/She.
PHRASES = {
    "add": [("{P} buys {x} more.", "After buying {x}", "bought"),
            ("{P} finds {x} more.", "After finding {x}", "found"),
            ("{P} gets {x} more as a gift.", "After getting {x}", "gift")],
    "sub": [("{P} gives {x} away.", "After giving {x} away", "given"),
            ("{P} loses {x}.", "After losing {x}", "lost"),
            ("{P} sells {x}.", "After selling {x}", "sold")],
    "mul": [("Then {p} has {x} times as many.", "With {x} times as many", "factor")],
    "div": [("{P} splits them into {x} equal groups and keeps one group.", "Keeping one of {x} groups", "groups")],
}
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


@dataclass(frozen=True)
class Difficulty:
    min_steps: int      # operations after the starting amount
    max_steps: int
    max_operand: int    # largest number that appears in a question (mul/div factors stay <= 5/9)
    max_value: int      # largest running total (and answer)
    ops: tuple[str, ...]
    # > 0: the "held-out equations" task (synthetic_heldout.py): this fraction of the equations
    # "a op b" is reserved for held-out items, every CoT is one of the valid step orders.
    held_out_equations: float = 0.0


LEVELS = {
    1: Difficulty(1, 2, 10, 20, ("add", "sub")),
    2: Difficulty(2, 3, 20, 50, ("add", "sub")),
    3: Difficulty(2, 3, 20, 100, ("add", "sub", "mul")),
    4: Difficulty(3, 4, 20, 100, ("add", "sub", "mul", "div")),
    5: Difficulty(4, 5, 50, 200, ("add", "sub", "mul", "div")),
    # Held-out items need an equation no train CoT shows, whatever step order they take; train
    # items' other valid orders do use them (docs/data.md, "Held-out equations").
    6: Difficulty(2, 3, 10, 20, ("add", "sub"), held_out_equations=0.3),
}


def get_difficulty(difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {sorted(LEVELS)} or a Difficulty, got {difficulty!r}")
    return LEVELS[difficulty]


@dataclass
class Step:
    op: str
    operand: int
    before: int
    after: int
    phrase: tuple[str, str, str]


def _feasible_operands(op: str, value: int, level: Difficulty) -> list[int]:
    if op == "add":
        return list(range(1, min(level.max_operand, level.max_value - value) + 1))
    if op == "sub":
        return list(range(1, min(level.max_operand, value - 1) + 1))  # keep at least one
    if op == "mul":
        return list(range(2, min(5, level.max_value // value) + 1))
    return [x for x in range(2, 10) if value % x == 0 and value // x >= 1]  # div: exact only


def _sample_steps(rng: random.Random, level: Difficulty) -> tuple[int, list[Step]]:
    start = rng.randint(2, level.max_operand)
    value, steps = start, []
    for _ in range(rng.randint(level.min_steps, level.max_steps)):
        options = {op: _feasible_operands(op, value, level) for op in level.ops}
        op = rng.choice([op for op, operands in options.items() if operands])  # add or sub always fits
        operand = rng.choice(options[op])
        after = {"add": value + operand, "sub": value - operand, "mul": value * operand, "div": value // operand}[op]
        steps.append(Step(op, operand, value, after, rng.choice(PHRASES[op])))
        value = after
    return start, steps


def _question(name: str, pronoun: str, obj: str, start: int, steps: list[Step]) -> str:
    sentences = [f"{name} has {start} {obj}."]
    for step in steps:
        sentences.append(step.phrase[0].format(P=pronoun.capitalize(), p=pronoun, x=step.operand))
    sentences.append(f"How many {obj} does {name} have now?")
    return " ".join(sentences)


def _ncot(name: str, pronoun: str, obj: str, start: int, steps: list[Step]) -> str:
    sentences = [f"{name} starts with {start} {obj}."]
    for step in steps:
        clause = step.phrase[1].format(x=step.operand)
        sentences.append(f"{clause} {pronoun} has {step.before} {SYMBOL[step.op]} {step.operand} = {step.after}.")
    return " ".join(sentences)


def _program(question: str, obj: str, start: int, steps: list[Step]) -> str:
    lines = [PROGRAM_HEADER.rstrip("\n"), f'    """{question}"""', f"    {obj} = {start}"]
    used = {}
    for step in steps:
        base = step.phrase[2]
        used[base] = used.get(base, 0) + 1
        var = base if used[base] == 1 else f"{base}_{used[base]}"
        lines += [f"    {var} = {step.operand}", f"    {obj} = {obj} {SYMBOL[step.op]} {var}"]
    lines += [f"    result = {obj}", "    return result"]
    return "\n".join(lines)


def _make_item(rng: random.Random, level: Difficulty, seed: int = 0) -> dict:
    name, pronoun = rng.choice(PEOPLE)
    obj = rng.choice(OBJECTS)
    start, steps = _sample_steps(rng, level)
    question = _question(name, pronoun, obj, start, steps)
    split = None
    if level.held_out_equations:  # the CoT takes one valid step order, the item belongs to one split
        from megatron_reft.data.synthetic_heldout import annotate_order

        split, steps = annotate_order(rng, start, steps, level, seed)
    return {"question": question, "answer": str(steps[-1].after),
            "ncot": _ncot(name, pronoun, obj, start, steps), "pcot": _program(question, obj, start, steps),
            "steps": len(steps), "split": split}


def _unique_items(n: int, seed: int, level: Difficulty, split: str | None = None) -> list[dict]:
    """The first n items of the seed's stream with distinct questions (of that split, if given)."""
    rng = random.Random(seed)
    items, seen = [], set()
    for _ in range(50 * n + 1000):
        if len(items) == n:
            return items
        item = _make_item(rng, level, seed)
        if item["split"] == split and item["question"] not in seen:
            seen.add(item["question"])
            items.append(item)
    if len(items) == n:
        return items
    raise ValueError(f"only {len(items)} distinct questions found at this difficulty; ask for fewer or raise it")


def _to_record(index: int, item: dict, cot_type: str, difficulty) -> Record:
    level_name = difficulty if isinstance(difficulty, int) else "custom"
    return Record(id=f"synthetic_{index}", question=item["question"], cot=item[cot_type], answer=item["answer"],
                  meta={"ncot": item["ncot"], "pcot": item["pcot"], "steps": item["steps"],
                        "difficulty": level_name})


def _train_split(level: Difficulty) -> str | None:
    return "train" if level.held_out_equations else None


def make_synthetic_records(n: int, seed: int = 0, difficulty=2, cot_type: str = "ncot") -> list[Record]:
    """n items with distinct questions; record.cot is the N-CoT or the program (cot_type), and
    record.meta holds both ("ncot", "pcot") plus the step count. Ids: synthetic_0 ... synthetic_{n-1}.
    With held-out equations these are train items (the held-out ones only come from the splits)."""
    check_cot_type(cot_type)
    level = get_difficulty(difficulty)
    items = _unique_items(n, seed, level, _train_split(level))
    return [_to_record(i, item, cot_type, difficulty) for i, item in enumerate(items)]


def make_synthetic_splits(n_train: int, n_test: int, seed: int = 0, difficulty=2,
                          cot_type: str = "ncot") -> tuple[list[Record], list[Record]]:
    """Train and held-out test items from one stream: no question appears in both, and the train
    part equals make_synthetic_records(n_train, seed, difficulty). Test ids continue the numbering.
    With held-out equations (level 6) the test items are those no train-equation path solves."""
    level = get_difficulty(difficulty)
    if not level.held_out_equations:
        records = make_synthetic_records(n_train + n_test, seed, difficulty, cot_type)
        return records[:n_train], records[n_train:]
    train = make_synthetic_records(n_train, seed, difficulty, cot_type)
    test = _unique_items(n_test, seed, level, "test")
    return train, [_to_record(n_train + i, item, cot_type, difficulty) for i, item in enumerate(test)]


# ---------------------------------------------------------------------------------------------
# tokenizer


def tokenizer_training_texts(records: list[Record]) -> list[str]:
    """Every string the model will see: prompts, N-CoT targets and programs.

    A fixed sample of every difficulty level is added, so one tokenizer covers every phrase
    template whatever level the given records were drawn at (still a pure function of records).
    """
    # level 6 reuses level 1-2 phrases; leaving it out keeps the tokenizer of the other levels unchanged
    plain = [level for level in sorted(LEVELS) if not LEVELS[level].held_out_equations]
    coverage = [record for level in plain for record in make_synthetic_records(300, 12345, level)]
    texts = [INSTRUCTION + COT_TRIGGER + ANSWER_TRIGGER]
    for record in list(records) + coverage:
        texts.append(build_prompt(record.question))
        ncot, program = record.meta.get("ncot"), record.meta.get("pcot")
        if record.cot and record.cot.lstrip().startswith(PROGRAM_HEADER.strip()):
            program = program or record.cot
        elif record.cot:
            ncot = ncot or record.cot
        if ncot:
            texts.append(ncot_target(ncot, record.answer))
        if program:
            texts.append(program)
    return texts


def train_synthetic_tokenizer(records: list[Record], out_dir: str, vocab_size: int = 384) -> Tokenizer:
    """A small SentencePiece model trained on the task text; deterministic for the same records.

    Digits are single pieces (split_digits) so numbers are spelled digit by digit, which a tiny
    model learns arithmetic on far more easily; "▁0".."▁9" are pieces too, so the space before a
    number costs no token of its own. Newlines and indentation survive (identity
    normalisation, "\\n" a piece of its own), so prompts and programs round-trip exactly, and
    no dummy "▁" is prefixed, so tokenizing prompt and target separately (SFT) or together (RL)
    gives the same ids at the seam.
    """
    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenizer_training_texts(records)), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, hard_vocab_limit=False,
        character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"] + [f"\u2581{digit}" for digit in range(10)], unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        max_sentence_length=16384, minloglevel=2,
    )
    path = os.path.join(out_dir, SENTENCEPIECE_FILE)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return load_tokenizer(path)
