"""One small tokenizer interface over a Hugging Face tokenizer directory or a SentencePiece model.

encode() never adds BOS or EOS: reft.md §2 builds sequences as prompt ids + target ids + EOS with
no BOS, and that is the caller's job (prompts.encode_sft).
"""
import logging
import os
import shutil

logger = logging.getLogger(__name__)

SENTENCEPIECE_FILE = "tokenizer.model"
HF_MARKERS = ("tokenizer.json", "tokenizer_config.json")
# decode_continuation decodes the response after this many prompt tokens (see its docstring).
CONTEXT_TOKENS = 8
# OPT/Galactica vocabularies: <s>=0, <pad>=1, </s>=2, <unk>=3. Galactica's HF tokenizer names no
# EOS; the ReFT reference then uses id 2 as EOS and id 1 as pad.
FALLBACK_EOS = (2, "</s>")
FALLBACK_PAD = (1, "<pad>")


class Tokenizer:
    """encode/decode plus the ids the trainers need. kind is "hf" or "sentencepiece"."""

    def __init__(self, backend, kind: str, path: str):
        self.backend, self.kind, self.path = backend, kind, path
        if kind == "hf":
            if backend.eos_token_id is None:
                _adopt_opt_special_tokens(backend, path)
            self.eos_id = backend.eos_token_id
            # Llama-family tokenizers have no pad token; padding is always loss-masked, so EOS will do.
            self.pad_id = backend.pad_token_id if backend.pad_token_id is not None else self.eos_id
            self.vocab_size = len(backend)
        else:
            self.eos_id = backend.eos_id()
            if self.eos_id < 0:
                raise ValueError(f"{path}: SentencePiece model has no EOS piece")
            self.pad_id = backend.pad_id() if backend.pad_id() >= 0 else self.eos_id
            self.vocab_size = backend.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self.kind == "hf":
            return self.backend(text, add_special_tokens=False)["input_ids"]
        return self.backend.encode(text)

    def decode(self, ids) -> str:
        """Special tokens dropped, nothing else touched: HF's clean-up of tokenization spaces
        (" ." -> ".", " 's" -> "'s") is off, since it would rewrite model-written code."""
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self.backend.decode(ids)  # control pieces (EOS, PAD) decode to nothing

    def decode_continuation(self, prefix_ids, ids) -> str:
        """The text `ids` add when they follow `prefix_ids`: exactly what decoding the whole
        sequence shows after the prefix's text, as the ReFT reference reads a response.

        Decoding `ids` alone is wrong for SentencePiece tokenizers with a dummy prefix (Llama,
        CodeLlama): the first piece of a sequence loses its leading "▁", so a P-CoT body
        "    x = 1" becomes "   x = 1" (an IndentationError). Decoders look back one token at
        most (dummy-prefix strip, byte fallback within a character, WordPiece "##"), so the last
        CONTEXT_TOKENS prompt tokens stand for the whole prompt: O(response) per call, not
        O(prompt + response). tests/test_response_text.py checks it against the whole prompt.
        """
        prefix_ids, ids = [int(i) for i in prefix_ids], [int(i) for i in ids]
        context = prefix_ids[-CONTEXT_TOKENS:]
        head = self.decode(context)
        if not head and len(context) < len(prefix_ids):  # special/empty tokens: use everything
            context = prefix_ids
            head = self.decode(context)
        if not head:
            return self.decode(ids)
        text = self.decode(context + ids)
        if text.startswith(head):
            return text[len(head):]
        # A character split across the seam (byte fallback): the prefix alone decodes its
        # first bytes as U+FFFD. Whatever follows the common part is the response's.
        common = len(os.path.commonprefix([head, text]))
        return text[common:]

    def id_to_piece(self, token_id: int) -> str:
        if self.kind == "hf":
            return self.backend.convert_ids_to_tokens(int(token_id))
        return self.backend.id_to_piece(int(token_id))

    def save(self, directory: str) -> None:
        """Write a directory that load_tokenizer() reads back."""
        os.makedirs(directory, exist_ok=True)
        if self.kind == "hf":
            self.backend.save_pretrained(directory)
            return
        target = os.path.join(directory, SENTENCEPIECE_FILE)
        if os.path.abspath(self.path) != os.path.abspath(target):
            shutil.copyfile(self.path, target)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, path={self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def _adopt_opt_special_tokens(backend, path: str) -> None:
    """No EOS defined (Galactica): take the OPT layout's </s> (id 2) as EOS and <pad> (id 1) as
    pad, as the ReFT reference does; anything else still has no EOS and is refused."""
    eos_id, eos_piece = FALLBACK_EOS
    if backend.convert_ids_to_tokens(eos_id) != eos_piece:
        raise ValueError(f"{path}: tokenizer has no EOS token and id {eos_id} is not {eos_piece!r}; "
                         "ReFT targets end with EOS (reft.md §2)")
    backend.eos_token = eos_piece
    pad_id, pad_piece = FALLBACK_PAD
    if backend.pad_token_id is None and backend.convert_ids_to_tokens(pad_id) == pad_piece:
        backend.pad_token = pad_piece
    logger.warning("%s: tokenizer defines no EOS; using id %d %r as EOS and id %s as pad, as the ReFT "
                   "reference does for Galactica", path, eos_id, eos_piece, backend.pad_token_id)


def load_tokenizer(path: str) -> Tokenizer:
    """A Hugging Face tokenizer directory (local files only), a SentencePiece .model file, or a
    directory holding only tokenizer.model (what train_synthetic_tokenizer writes)."""
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, name)) for name in HF_MARKERS):
            return _load_hf(path)
        sp_file = os.path.join(path, SENTENCEPIECE_FILE)
        if os.path.exists(sp_file):
            return _load_sentencepiece(sp_file)
        raise FileNotFoundError(f"{path}: no tokenizer.json, tokenizer_config.json or tokenizer.model")
    if os.path.isfile(path) and path.endswith(".model"):
        return _load_sentencepiece(path)
    raise FileNotFoundError(f"{path}: not a tokenizer directory or a SentencePiece .model file")


def _load_hf(path: str) -> Tokenizer:
    from transformers import AutoTokenizer

    return Tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), "hf", path)


def _load_sentencepiece(path: str) -> Tokenizer:
    import sentencepiece as spm

    return Tokenizer(spm.SentencePieceProcessor(model_file=path), "sentencepiece", path)
