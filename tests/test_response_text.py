"""Response text is exactly what the model wrote, for the tokenizer kinds real models use
(issue 9; tests/tokenizer_kinds.py builds them from SVAMP text, no downloads).

Every SVAMP gold P-CoT program (3,043) and N-CoT target (3,076), tokenised the way SFT and RL
do, decoded through evaluation.run.response_text (what PPO scoring and greedy eval call) and
scored by the RewardScorer / sandbox training uses, earns 1.0. Decoding the response alone, as
before, breaks every program under a Llama-style tokenizer. The SFT ⇄ RL seam of reft.md §2 is
pinned per kind (docs/data.md, "Tokenizer seams").
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tokenizer_kinds  # noqa: E402

from megatron_reft.data import (build_rl_prompt, build_target, encode_rl_prompt, encode_sft,  # noqa: E402
                                load_records, pcot_prefill)
from megatron_reft.evaluation.run import response_text  # noqa: E402
from megatron_reft.reward import RewardConfig, RewardScorer  # noqa: E402

MWP = Path(__file__).resolve().parents[2] / "shared" / "data" / "mwp_reft"
pytestmark = pytest.mark.skipif(not MWP.is_dir(), reason=f"{MWP} not found (shared data absent)")
DUMMY_PREFIX_KINDS = ("llama-sentencepiece", "llama-hf")


@pytest.fixture(scope="module")
def svamp():
    if not MWP.is_dir():
        pytest.skip(f"{MWP} not found")
    pcot = load_records(str(MWP / "svamp_python_sdp.json"), "pcot")[0]
    ncot = load_records(str(MWP / "svamp_nl.json"), "ncot")[0]
    assert (len(pcot), len(ncot)) == (3043, 3076)
    return {"pcot": pcot, "ncot": ncot}


@pytest.fixture(scope="module")
def tokenizers(svamp, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokenizer-kinds")
    records = svamp["pcot"] + svamp["ncot"]
    return {kind: tokenizer_kinds.build(kind, records, workdir) for kind in tokenizer_kinds.KINDS}


@pytest.fixture(scope="module")
def pcot_scorer():
    with RewardScorer(RewardConfig(cot_type="pcot", num_workers=2)) as scorer:
        yield scorer


def score_all(scorer, texts, records) -> list[float]:
    """Rewards, each distinct text scored once (the kinds mostly produce the same texts)."""
    unique = {}
    for text, record in zip(texts, records):
        unique.setdefault((text, record.answer), (text, record))
    pairs = list(unique.values())
    results = scorer.score([t for t, _ in pairs], [r.answer for _, r in pairs], [r.answer_type for _, r in pairs])
    reward = {(t, r.answer): s.reward for (t, r), s in zip(pairs, results)}
    return [reward[(t, r.answer)] for t, r in zip(texts, records)]


def program_body(program: str) -> str:
    """What the policy writes after the RL prefill: the program after its docstring line (37
    SVAMP programs spell the docstring differently from the question, e.g. "Bob’s" vs "Bob ’ s")."""
    program = program.strip()
    opening = program.index('"""') + 3
    return program[program.index('"""\n', opening) + 4:]


def policy_continuation(tokenizer, prompt_text: str, prompt_ids: list[int], text: str) -> list[int]:
    """Token ids a policy writes to spell `text` after the prompt: how a one-string tokenisation
    splits after the prompt ids when it starts with them (tokenizers with a dummy prefix, whose
    stand-alone encoding of `text` would add a space), else `text` encoded on its own (byte-level
    BPE, where "\\n" and the next indentation merge across the seam)."""
    joint = tokenizer.encode(prompt_text + text)
    if joint[:len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    return tokenizer.encode(text)


def decoded_after_whole_prompt(tokenizer, prompt_ids, response_ids) -> str:
    """The reference's reading (decode everything, cut the decoded prompt off) - what
    decode_continuation must equal while decoding only a few prompt tokens."""
    whole, head = tokenizer.decode(prompt_ids + response_ids), tokenizer.decode(prompt_ids)
    assert whole.startswith(head)
    return whole[len(head):]


def sft_split(tokenizer, record, cot_type):
    example = encode_sft(tokenizer, record, cot_type)
    n_prompt = example.loss_mask.index(1)
    return example.input_ids[:n_prompt], example.input_ids[n_prompt:]


def expected_sft_text(kind: str, target: str) -> str:
    # SFT tokenizes the target on its own, so a dummy-prefix tokenizer puts "▁" in front of it:
    # the sequence the model learns reads "...reasoning:\n def solution()...". Exact, not a bug.
    return " " + target if kind in DUMMY_PREFIX_KINDS else target


@pytest.mark.parametrize("kind", tokenizer_kinds.KINDS)
def test_pcot_gold_programs_score_one_at_rl_time(kind, tokenizers, svamp, pcot_scorer):
    """RL: prompt + prefill tokenised as one string, the policy writes the body (+ EOS)."""
    tok, records = tokenizers[kind], svamp["pcot"]
    texts = []
    for index, record in enumerate(records):
        prompt_ids = encode_rl_prompt(tok, record, "pcot")
        body = program_body(record.cot)
        response = policy_continuation(tok, build_rl_prompt(record, "pcot"), prompt_ids, body) + [tok.eos_id]
        text = response_text(tok, record, response, "pcot", prompt_ids)
        assert text == pcot_prefill(record.question) + body, record.id
        if index % 7 == 0:  # a sample against decoding the whole prompt
            assert text == pcot_prefill(record.question) + decoded_after_whole_prompt(tok, prompt_ids, response[:-1])
        texts.append(text)
    assert score_all(pcot_scorer, texts, records) == [1.0] * len(records)


@pytest.mark.parametrize("kind", tokenizer_kinds.KINDS)
def test_pcot_gold_programs_score_one_in_sft_sequences(kind, tokenizers, svamp, pcot_scorer):
    """SFT: prompt and program tokenised separately; the target read back after the prompt."""
    tok, records = tokenizers[kind], svamp["pcot"]
    texts = []
    for record in records:
        prompt_ids, target_ids = sft_split(tok, record, "pcot")
        text = tok.decode_continuation(prompt_ids, target_ids)
        assert text == expected_sft_text(kind, record.cot.strip()), record.id
        texts.append(text)
    assert score_all(pcot_scorer, texts, records) == [1.0] * len(records)


@pytest.mark.parametrize("kind", tokenizer_kinds.KINDS)
def test_ncot_gold_targets_score_one(kind, tokenizers, svamp):
    """N-CoT: the RL prompt is the SFT prompt, and the policy writes the SFT target (+ EOS)."""
    tok, records = tokenizers[kind], svamp["ncot"]
    scorer = RewardScorer(RewardConfig(cot_type="ncot"))
    texts = []
    for index, record in enumerate(records):
        prompt_ids, target_ids = sft_split(tok, record, "ncot")
        assert prompt_ids == encode_rl_prompt(tok, record, "ncot")
        text = response_text(tok, record, target_ids, "ncot", prompt_ids)
        assert text == expected_sft_text(kind, build_target(record, "ncot")), record.id
        if index % 7 == 0:
            assert text == decoded_after_whole_prompt(tok, prompt_ids, target_ids[:-1])
        texts.append(text)
    results = scorer.score(texts, [r.answer for r in records], [r.answer_type for r in records])
    assert [r.reward for r in results] == [1.0] * len(records)


@pytest.mark.parametrize("kind", DUMMY_PREFIX_KINDS)
def test_decoding_the_response_alone_breaks_llama_programs(kind, tokenizers, svamp, pcot_scorer):
    """The bug this fixes: decoded alone, the body's first line loses a space of indentation
    (the dummy-prefix strip), and every program fails with an IndentationError."""
    tok, records = tokenizers[kind], svamp["pcot"][:300]
    texts = []
    for record in records:
        prompt_ids = encode_rl_prompt(tok, record, "pcot")
        body = program_body(record.cot)
        response = policy_continuation(tok, build_rl_prompt(record, "pcot"), prompt_ids, body)
        alone = tok.decode(response)
        assert alone == body[1:], record.id  # "   num = 5": three spaces, not four
        texts.append(pcot_prefill(record.question) + alone)
    results = pcot_scorer.score(texts, [r.answer for r in records], [r.answer_type for r in records])
    assert {r.reward for r in results} == {0.0}
    assert {r.status for r in results} == {"error:IndentationError"}


# The SFT ⇄ RL seam (reft.md §2): do the ids SFT trains on start with the ids of the RL prompt?
#   synthetic: yes (no dummy prefix; the "\n" before the body is a piece of its own), except
#     for the 37 programs whose docstring differs from the question;
#   llama-*: never - SFT's target starts with a dummy-prefixed "▁def" after the prompt's "\n",
#     the one-string RL prompt has "def" glued to "\n" with no space;
#   gpt2-bytelevel: never - the program's "\n" and the next line's indentation are one
#     pre-token in SFT, while the RL prompt ends at that "\n".
SEAM_MATCHES = {"synthetic": 3043 - 37, "llama-sentencepiece": 0, "llama-hf": 0, "gpt2-bytelevel": 0}


@pytest.mark.parametrize("kind", tokenizer_kinds.KINDS)
def test_sft_rl_seam(kind, tokenizers, svamp):
    tok, records = tokenizers[kind], svamp["pcot"]
    matches = 0
    for record in records:
        prompt_ids, target_ids = sft_split(tok, record, "pcot")
        rl_ids = encode_rl_prompt(tok, record, "pcot")
        matches += (prompt_ids + target_ids)[:len(rl_ids)] == rl_ids
    assert matches == SEAM_MATCHES[kind]


def test_decode_continuation_falls_back_to_the_whole_prompt_when_the_context_decodes_empty(tokenizers):
    tok = tokenizers["llama-sentencepiece"]
    prompt = tok.encode("Question:\nx\n") + [tok.eos_id] * 20  # context = 8 EOS, decoding to ""
    body = tok.encode("a\n    b = 1")
    joint = tok.encode("Question:\nx\na\n    b = 1")
    assert tok.decode_continuation(prompt, joint[len(tok.encode("Question:\nx\n")):]) == "a\n    b = 1"
    assert tok.decode_continuation([], body) == "a\n    b = 1"


def test_wrapper_loads_llama_tokenizers_alike(tokenizers, svamp, tmp_path):
    """Our wrapper over the SentencePiece .model, over the HF Llama directory (tokenizer.json)
    and over an older-style directory with only tokenizer.model + tokenizer_config.json (which
    transformers converts on load): same ids for every SVAMP prompt and program (no BOS, no
    EOS added), same EOS, same decoded text."""
    import shutil

    from megatron_reft.data import load_tokenizer

    spm_tok, hf_tok = tokenizers["llama-sentencepiece"], tokenizers["llama-hf"]
    shutil.copyfile(spm_tok.path, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "add_bos_token": True, "legacy": True}))
    converted = load_tokenizer(str(tmp_path))
    assert (spm_tok.kind, hf_tok.kind, converted.kind) == ("sentencepiece", "hf", "hf")
    assert {(t.eos_id, t.vocab_size) for t in (spm_tok, hf_tok, converted)} == {(2, 2000)}
    for record in svamp["pcot"]:
        for text in (build_rl_prompt(record, "pcot"), record.cot):
            ids = spm_tok.encode(text)
            assert hf_tok.encode(text) == converted.encode(text) == ids and ids[0] != 1, record.id
            assert hf_tok.decode(ids) == converted.decode(ids) == spm_tok.decode(ids) == text


@pytest.mark.parametrize("class_name", ["LlamaTokenizer", "LlamaTokenizerFast"])
def test_hf_llama_classes_read_responses_exactly(class_name, tokenizers, svamp, tmp_path):
    """transformers' Llama tokenizer classes straight from the SentencePiece model (in
    transformers 5 both names are one tokenizers-backed class; in 4.x LlamaTokenizer is the
    slow, sentencepiece-backed one): their decoder strips the leading space of a sequence, and
    decode_continuation still gives the program body exactly."""
    import shutil

    import transformers

    from megatron_reft.data import Tokenizer

    shutil.copyfile(tokenizers["llama-sentencepiece"].path, tmp_path / "tokenizer.model")
    tok = Tokenizer(getattr(transformers, class_name).from_pretrained(str(tmp_path)), "hf", str(tmp_path))
    for record in svamp["pcot"][:300]:
        prompt_ids = encode_rl_prompt(tok, record, "pcot")
        body = program_body(record.cot)
        response = policy_continuation(tok, build_rl_prompt(record, "pcot"), prompt_ids, body)
        assert tok.decode(response) == body[1:]  # decoded alone: one space short
        assert response_text(tok, record, response + [tok.eos_id], "pcot", prompt_ids) == \
            pcot_prefill(record.question) + body, record.id
