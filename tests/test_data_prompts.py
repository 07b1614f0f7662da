"""reft.md §2 strings exactly, and prompt masking, on real records and on fixtures."""
from pathlib import Path

import pytest

from megatron_reft.data.loaders import load_records
from megatron_reft.data.prompts import (OverlongError, build_prompt, build_rl_prompt, build_target,
                                        encode_rl_prompt, encode_rl_prompts, encode_sft, encode_sft_records,
                                        ncot_target, pcot_prefill)
from megatron_reft.data.records import MalformedRecordError, Record

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real data not found at {DATA} (only present in the development checkout)")
    return DATA


class CharTokenizer:
    """One id per character (plus EOS = 1), so decoding any slice of ids gives back exact text."""
    eos_id, pad_id = 1, 0

    def encode(self, text):
        return [ord(c) + 2 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids if i >= 2)


def check_masking(example, prompt, target):
    tok = CharTokenizer()
    n_prompt = len(prompt)
    assert example.input_ids[-1] == tok.eos_id  # EOS closes every target, no BOS in front
    assert example.loss_mask == [0] * n_prompt + [1] * (len(target) + 1)
    assert tok.decode(example.input_ids[:n_prompt]) == prompt
    assert tok.decode([i for i, m in zip(example.input_ids, example.loss_mask) if m]) == target


SVAMP_0_QUESTION = ("tyler an animal rights advocate decided to build his own animal sanctuary to protect different "
                    "animals from poachers . the sanctuary was divided into different regions . the first region to "
                    "be built was a bird sanctuary . initially he had 29 endangered bird species on that region . if "
                    "each species has 7 pairs of birds how many pairs does he have in total ?")


def test_svamp_ncot_full_sft_text(data):
    record = load_records(str(data / "mwp_reft/svamp_nl.json"))[0][0]
    prompt = "Question:\n" + SVAMP_0_QUESTION + "\nAnswer reasoning:\n"
    # The released CoT already ends with its own "<203>." sentence; the reference appends the
    # trigger and the answer_value string ("203.0") regardless.
    target = ("If Tyler initially had 29 endangered bird species in the bird sanctuary and each species has 7 pairs "
              "of birds, we can find the total number of pairs of birds by multiplying the number of species by the "
              "number of pairs per species.\n\n29 species * 7 pairs per species = 203 pairs of birds\n\nTherefore, "
              "Tyler has a total of 203 pairs of birds in the bird sanctuary.\n\nTherefore, the answer is <203>."
              "\nTherefore, the answer is: 203.0")
    assert build_prompt(record.question) == prompt
    assert build_target(record, "ncot") == target
    check_masking(encode_sft(CharTokenizer(), record, "ncot"), prompt, target)


def test_svamp_pcot_target_and_rl_prefill(data):
    records = load_records(str(data / "mwp_reft/svamp_python_sdp.json"), "pcot")[0]
    program = ('def solution():\n    """' + SVAMP_0_QUESTION + '"""\n    num_species = 29\n    num_pairs_per_species = 7\n'
               "    num_pairs_total = num_species * num_pairs_per_species\n    result = num_pairs_total\n    return result")
    assert build_target(records[0], "pcot") == program
    rl_prompt = build_rl_prompt(records[0], "pcot")
    assert rl_prompt == build_prompt(SVAMP_0_QUESTION) + 'def solution():\n    """' + SVAMP_0_QUESTION + '"""'
    check_masking(encode_sft(CharTokenizer(), records[0], "pcot"), build_prompt(SVAMP_0_QUESTION), program)
    # The RL pre-fill reproduces the start of the SFT text wherever the program's docstring is
    # the question verbatim: 3006 of 3043 (37 programs carry a detokenized question instead).
    matching = [r for r in records if (build_prompt(r.question) + r.cot).startswith(build_rl_prompt(r, "pcot"))]
    assert len(matching) == 3006


def test_gsm8k_real_line_target(data):
    record = load_records(str(data / "gsm8k/train.jsonl"))[0][0]
    assert build_target(record, "ncot") == ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
                                            "altogether in April and May.\nTherefore, the answer is: 72")


def test_mathqa_mcq_target_ends_with_letter(data):
    record = load_records(str(data / "mwp_reft/mathqa_test_set.json"), require_cot=False)[0][0]
    record.cot = "the profit is 38 %"
    assert build_target(record, "ncot") == "the profit is 38 %\nTherefore, the answer is: a"
    assert build_prompt(record.question).endswith("e ) none of these\nAnswer reasoning:\n")


def test_fixture_strings_exact():
    record = Record("toy_0", "  Tom has 2 apples. He buys 3 more. How many?\n", "  2 + 3 = 5.\n", "5")
    assert build_prompt(record.question) == "Question:\nTom has 2 apples. He buys 3 more. How many?\nAnswer reasoning:\n"
    assert ncot_target(record.cot, record.answer) == "2 + 3 = 5.\nTherefore, the answer is: 5"
    assert pcot_prefill(" How many? ") == 'def solution():\n    """How many?"""'
    assert build_rl_prompt(record, "ncot") == build_prompt(record.question)
    example = encode_sft(CharTokenizer(), record, "ncot")
    check_masking(example, build_prompt(record.question), "2 + 3 = 5.\nTherefore, the answer is: 5")
    assert len(example) == len(build_prompt(record.question)) + len("2 + 3 = 5.\nTherefore, the answer is: 5") + 1


def test_rl_prompt_pcot_ids_start_the_sft_ids():
    """The RL prompt's ids are the first ids of the SFT sequence (prompt and program tokenised
    apart), not the one-string tokenisation, and stop before any token that crosses the
    header's end (here one that merges the closing quotes with the newline)."""
    class SeamTokenizer(CharTokenizer):
        """Merges ':\\nd' and '?\"\"\"\\n' into single ids, as real tokenizers merge across seams."""
        def encode(self, text):
            return super().encode(text.replace(":\nd", "\x00").replace('?"""\n', "\x01"))

        def decode(self, ids):
            return super().decode(ids).replace("\x00", ":\nd").replace("\x01", '?"""\n')

        def decode_continuation(self, prefix_ids, ids):
            return self.decode(prefix_ids + ids)[len(self.decode(prefix_ids)):]

    record = Record("toy_0", "How many?", 'def solution():\n    """How many?"""\n    return 5', "5")
    tokenizer = SeamTokenizer()
    ids = encode_rl_prompt(tokenizer, record, "pcot")
    assert ids == encode_sft(tokenizer, record, "pcot").input_ids[:len(ids)]
    assert 2 not in ids  # not the one-string seam id of ":\nd"
    assert tokenizer.decode(ids).endswith('"""How many')  # "?\"\"\"\n" is left to the policy
    from megatron_reft.evaluation.run import response_text

    assert response_text(tokenizer, record, tokenizer.encode('?"""\n    return 5') + [tokenizer.eos_id], "pcot", ids) \
        == record.cot


def test_sft_needs_a_cot_and_a_known_type():
    with pytest.raises(ValueError, match="no cot"):
        encode_sft(CharTokenizer(), Record("t_0", "q", None, "1"), "ncot")
    with pytest.raises(ValueError, match="cot_type"):
        encode_sft(CharTokenizer(), Record("t_0", "q", "c", "1"), "python")


def test_overlong_items_are_counted_or_raise():
    records = [Record("t_0", "q", "short", "1"), Record("t_1", "q", "a much longer chain of thought", "1"),
               Record("t_2", "a long question " * 5, "c", "1")]
    prompt_len = len(build_prompt("q"))
    max_length = prompt_len + len(ncot_target("short", "1")) + 1
    examples, kept, report = encode_sft_records(CharTokenizer(), records, "ncot", max_length)
    assert [r.id for r in kept] == ["t_0"] and len(examples) == 1 and len(examples[0]) == max_length
    assert dict(report.malformed) == {"sequence_too_long": 2}
    with pytest.raises(MalformedRecordError, match="record 1: sequence_too_long"):
        encode_sft_records(CharTokenizer(), records, "ncot", max_length, on_malformed="raise")
    with pytest.raises(OverlongError):
        encode_sft(CharTokenizer(), records[1], "ncot", max_length)
    prompts, kept, report = encode_rl_prompts(CharTokenizer(), records, "ncot", max_prompt_length=prompt_len + 5)
    assert [r.id for r in kept] == ["t_0", "t_1"] and dict(report.malformed) == {"prompt_too_long": 1}
    assert prompts[0] == CharTokenizer().encode(build_prompt("q"))
