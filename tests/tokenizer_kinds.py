"""The tokenizer kinds real models use, built from SVAMP text in a few seconds (no downloads),
for tests/test_response_text.py:

    llama-sentencepiece  SentencePiece BPE like Llama/CodeLlama's: add_dummy_prefix, byte fallback,
                         identity normalisation, split digits; loaded with `sentencepiece`
    llama-hf             the same model through transformers' LlamaTokenizer (which in
                         transformers 5 is also LlamaTokenizerFast), saved and loaded as a HF dir
    gpt2-bytelevel       GPT-2-style byte-level BPE (HF `tokenizers`), as SmolLM2 / Galactica use
    synthetic            the project's own (train_synthetic_tokenizer) on the same text
"""
import io
from pathlib import Path

KINDS = ("llama-sentencepiece", "llama-hf", "gpt2-bytelevel", "synthetic")


def training_texts(records) -> list[str]:
    from megatron_reft.data import build_prompt

    texts = []
    for record in records:
        texts.append(build_prompt(record.question))
        if record.cot:
            texts.append(record.cot)
    return texts


def llama_sentencepiece_model(texts, path: Path, vocab_size: int = 2000) -> Path:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.9995, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, max_sentence_length=16384)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def llama_hf_dir(sp_model: Path, out: Path) -> Path:
    """transformers' LlamaTokenizer converted from the SentencePiece model, saved as a HF dir."""
    import shutil

    from transformers import LlamaTokenizer

    src = out.parent / (out.name + ".src")
    src.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, src / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(src)).save_pretrained(str(out))
    return out


def gpt2_bytelevel_dir(texts, out: Path, vocab_size: int = 2000, eos: bool = True) -> Path:
    """Byte-level BPE with GPT-2's pre-tokenizer and decoder; `eos=False` leaves EOS undefined
    (Galactica's HF tokenizer) with the OPT special-token layout <s>, <pad>, </s>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(texts, trainer)
    specials = {"bos_token": "<s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if eos:
        specials["eos_token"] = "</s>"
    else:
        specials.pop("pad_token")
    PreTrainedTokenizerFast(tokenizer_object=raw, **specials).save_pretrained(str(out))
    return out


def build(kind: str, records, workdir: Path):
    """Our Tokenizer wrapper over the given kind, trained on the records' text."""
    from megatron_reft.data import load_tokenizer, train_synthetic_tokenizer

    texts = training_texts(records)
    if kind == "llama-sentencepiece":
        return load_tokenizer(str(llama_sentencepiece_model(texts, workdir / "llama" / "tokenizer.model")))
    if kind == "llama-hf":
        sp_model = workdir / "llama" / "tokenizer.model"
        if not sp_model.exists():
            llama_sentencepiece_model(texts, sp_model)
        return load_tokenizer(str(llama_hf_dir(sp_model, workdir / "llama-hf")))
    if kind == "gpt2-bytelevel":
        return load_tokenizer(str(gpt2_bytelevel_dir(texts, workdir / "gpt2")))
    if kind == "synthetic":
        return train_synthetic_tokenizer(records, str(workdir / "synthetic"), vocab_size=1000)
    raise ValueError(kind)
