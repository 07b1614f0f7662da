"""The synthetic task, its SentencePiece tokenizer, and loading tokenizers from disk."""
import re
import statistics

import pytest

from megatron_reft.data.prompts import build_prompt, build_target, encode_rl_prompt, encode_sft
from megatron_reft.data.synthetic import LEVELS, Difficulty, make_synthetic_records, make_synthetic_splits, \
    train_synthetic_tokenizer
from megatron_reft.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_synthetic_tokenizer(make_synthetic_records(2000, seed=0, difficulty=2),
                                     str(tmp_path_factory.mktemp("tok")))


def run_program(program: str):
    namespace = {}
    exec(program, namespace)  # our own generated programs, not model output
    return namespace["solution"]()


def test_deterministic_and_seed_dependent():
    first = make_synthetic_records(50, seed=7, difficulty=3)
    assert first == make_synthetic_records(50, seed=7, difficulty=3)
    assert first != make_synthetic_records(50, seed=8, difficulty=3)
    assert first[0].id == "synthetic_0" and first[0].answer_type == "number"


def test_fixed_item_text():
    # Pins the generator: a change here changes every quickstart number, so it must be deliberate.
    record = make_synthetic_records(1, seed=0, difficulty=2)[0]
    assert record.question == ("Ben has 3 shells. He loses 2. He gets 12 more as a gift. He buys 17 more. "
                               "How many shells does Ben have now?")
    assert record.cot == ("Ben starts with 3 shells. After losing 2 he has 3 - 2 = 1. After getting 12 he has "
                          "1 + 12 = 13. After buying 17 he has 13 + 17 = 30.")
    assert record.answer == "30"
    assert record.meta["pcot"] == (
        'def solution():\n    """' + record.question + '"""\n    shells = 3\n    lost = 2\n    shells = shells - lost\n'
        "    gift = 12\n    shells = shells + gift\n    bought = 17\n    shells = shells + bought\n"
        "    result = shells\n    return result")


@pytest.mark.parametrize("difficulty", sorted(LEVELS))
def test_ncot_and_program_agree_with_answer(difficulty):
    level = LEVELS[difficulty]
    for record in make_synthetic_records(200, seed=1, difficulty=difficulty, cot_type="pcot"):
        assert record.cot == record.meta["pcot"]
        assert run_program(record.cot) == pytest.approx(float(record.answer))
        equations = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", record.meta["ncot"])
        assert len(equations) == record.meta["steps"]
        assert level.min_steps <= record.meta["steps"] <= level.max_steps
        for a, op, b, c in equations:
            assert eval(f"{a} {op} {b}") == int(c) and 0 < int(c) <= level.max_value
        assert equations[-1][3] == record.answer


def test_splits_do_not_overlap_and_extend_the_train_stream():
    train, test = make_synthetic_splits(300, 100, seed=3, difficulty=2)
    assert len(train) == 300 and len(test) == 100
    assert not {r.question for r in train} & {r.question for r in test}
    assert len({r.id for r in train + test}) == 400
    assert train == make_synthetic_records(300, seed=3, difficulty=2)


def test_difficulty_knob_and_exhaustion():
    easy = make_synthetic_records(300, seed=0, difficulty=1)
    hard = make_synthetic_records(300, seed=0, difficulty=5)
    assert statistics.mean(r.meta["steps"] for r in easy) < statistics.mean(r.meta["steps"] for r in hard)
    tiny = Difficulty(min_steps=1, max_steps=1, max_operand=2, max_value=4, ops=("add",))
    with pytest.raises(ValueError, match="distinct questions"):
        make_synthetic_records(500, seed=0, difficulty=tiny)
    with pytest.raises(ValueError, match="difficulty"):
        make_synthetic_records(3, difficulty=9)


def test_tokenizer_is_deterministic(tmp_path):
    records = make_synthetic_records(300, seed=0, difficulty=1)
    a = train_synthetic_tokenizer(records, str(tmp_path / "a"))
    b = train_synthetic_tokenizer(records, str(tmp_path / "b"))
    assert (tmp_path / "a/tokenizer.model").read_bytes() == (tmp_path / "b/tokenizer.model").read_bytes()
    assert a.vocab_size == 384 and (a.eos_id, a.pad_id) == (2, 3)


def test_tokenizer_roundtrip_digits_and_lengths(tokenizer):
    records = make_synthetic_records(300, seed=11, difficulty=2)
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(" has 137 apples")]
    assert pieces == ["\u2581has", "\u25811", "3", "7", "\u2581apples"]  # one digit per piece
    prompt_lengths, cot_lengths = [], []
    for record in records:
        example = encode_sft(tokenizer, record, "ncot")
        text = build_prompt(record.question) + build_target(record, "ncot")
        assert tokenizer.decode(example.input_ids) == text  # EOS decodes to nothing
        assert 0 not in example.input_ids  # no <unk>
        prompt_lengths.append(example.loss_mask.count(0))
        cot_lengths.append(example.loss_mask.count(1))
    # The quickstart budget: short prompts and CoTs (see docs/data.md for all levels).
    assert statistics.mean(prompt_lengths) < 40 and max(prompt_lengths) <= 50
    assert statistics.mean(cot_lengths) < 60 and max(cot_lengths) <= 75


@pytest.mark.parametrize("cot_type", ["ncot", "pcot"])
def test_rl_prompt_matches_sft_prefix_at_the_seam(tokenizer, cot_type):
    # With no dummy prefix and "\n" a piece of its own, tokenizing prompt + pre-fill as one string
    # (RL) gives exactly the first ids of prompt + target tokenized apart (SFT).
    for record in make_synthetic_records(100, seed=5, difficulty=2, cot_type=cot_type):
        sft_ids = encode_sft(tokenizer, record, cot_type).input_ids
        rl_ids = encode_rl_prompt(tokenizer, record, cot_type)
        assert sft_ids[:len(rl_ids)] == rl_ids


def test_load_tokenizer_from_dir_and_file(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "saved"))
    for path in (tmp_path / "saved", tmp_path / "saved" / "tokenizer.model"):
        loaded = load_tokenizer(str(path))
        assert loaded.kind == "sentencepiece" and loaded.encode("Ben has 3") == tokenizer.encode("Ben has 3")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path))


def test_load_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer as RawTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "Question": 3, ":": 4, "Tom": 5, "has": 6, "3": 7}
    raw = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
                            ).save_pretrained(str(tmp_path / "hf"))
    loaded = load_tokenizer(str(tmp_path / "hf"))
    assert loaded.kind == "hf" and loaded.encode("Tom has 3") == [5, 6, 7]  # no BOS, no EOS
    assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (2, 2, 8)  # pad falls back to EOS
    assert loaded.decode([5, 6, 2]) == "Tom has"


# --- level 6, "held-out equations": the task where SFT's best epoch is a meaningful baseline ----

def _equation_table(records):
    from megatron_reft.data.synthetic_heldout import record_equations

    return {eq for record in records for eq in record_equations(record.meta["ncot"])}


def _question_steps(record):
    """(start, [(op, operand)] in question order) read back from the question text."""
    from megatron_reft.data.synthetic import PHRASES

    numbers = [int(x) for x in re.findall(r"\d+", record.question)]
    ops = []
    for sentence in record.question.split(". ")[1:-1] + [record.question.split(". ")[-1].split("?")[0]]:
        for op, phrases in PHRASES.items():
            if any(sentence.startswith(p[0].split("{x}")[0].format(P=sentence.split()[0], p="")) for p in phrases):
                ops.append(op)
                break
    return numbers[0], list(zip(ops, numbers[1:]))


def _memoriser_solves(record, table) -> bool:
    """A model that memorised every train CoT's equations and tries every valid step order: it
    solves an item only if some order uses nothing but equations it has seen."""
    import itertools

    from megatron_reft.data.synthetic_heldout import SYMBOL, replay

    start, ops = _question_steps(record)
    for order in itertools.permutations(ops):
        path = replay(start, list(order), LEVELS[6].max_value)
        if path and all((b, SYMBOL[op], x) in table for b, op, x, _ in path):
            assert str(path[-1][3]) == record.answer
            return True
    return False


def test_heldout_equations_split_is_disjoint_and_deterministic():
    train, test = make_synthetic_splits(2000, 200, seed=0, difficulty=6)
    assert (len(train), len(test)) == (2000, 200)
    assert not {r.question for r in train} & {r.question for r in test}
    assert len({r.id for r in train + test}) == 2200
    assert train == make_synthetic_records(2000, seed=0, difficulty=6)
    assert (train, test) == make_synthetic_splits(2000, 200, seed=0, difficulty=6)
    # not even the numbers of a question are shared (names/objects aside)
    assert not {str(_question_steps(r)) for r in train} & {str(_question_steps(r)) for r in test}


def test_memorising_the_train_equations_solves_train_but_no_heldout_item():
    train, test = make_synthetic_splits(2000, 200, seed=0, difficulty=6)
    table = _equation_table(train)
    assert all(_memoriser_solves(r, table) for r in train[:300])
    assert not any(_memoriser_solves(r, table) for r in test)
    # every held-out annotated path shows at least one equation absent from all train CoTs
    assert all(set(_equation_table([r])) - table for r in test)


def test_train_items_have_other_valid_paths_through_heldout_equations():
    # What RL can use and SFT cannot: a train question's other valid orders meet equations that
    # no train CoT shows (the answer reward accepts every order).
    import itertools

    from megatron_reft.data.synthetic_heldout import SYMBOL, replay

    train, _ = make_synthetic_splits(2000, 200, seed=0, difficulty=6)
    table = _equation_table(train)
    with_unseen_path, orders_differ = 0, 0
    for record in train[:500]:
        start, ops = _question_steps(record)
        paths = [p for p in (replay(start, list(o), LEVELS[6].max_value) for o in itertools.permutations(ops)) if p]
        assert {str(p[-1][3]) for p in paths} == {record.answer}  # every valid order reaches the answer
        with_unseen_path += any((b, SYMBOL[op], x) not in table for p in paths for b, op, x, _ in p)
        orders_differ += [(b, SYMBOL[op], x) for b, op, x, _ in paths[0]] != _equation_table_list(record)
    assert with_unseen_path > 100, with_unseen_path
    assert orders_differ > 100, orders_differ  # annotated paths are not always the question's order


def _equation_table_list(record):
    from megatron_reft.data.synthetic_heldout import record_equations

    return record_equations(record.meta["ncot"])
