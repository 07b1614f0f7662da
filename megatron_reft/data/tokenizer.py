"""One small tokenizer interface over a Hugging Face tokenizer directory or a SentencePiece model.

encode() never adds BOS or EOS: reft.md §2 builds sequences as prompt ids + target ids + EOS with
no BOS, and that is the caller's job (prompts.encode_sft).
"""
import os
import shutil

SENTENCEPIECE_FILE = "tokenizer.model"
HF_MARKERS = ("tokenizer.json", "tokenizer_config.json")


class Tokenizer:
    """encode/decode plus the ids the trainers need. kind is "hf" or "sentencepiece"."""

    def __init__(self, backend, kind: str, path: str):
        self.backend, self.kind, self.path = backend, kind, path
        if kind == "hf":
            if backend.eos_token_id is None:
                raise ValueError(f"{path}: tokenizer has no EOS token; ReFT targets end with EOS (reft.md §2)")
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
        ids = [int(i) for i in ids]
        if self.kind == "hf":
            return self.backend.decode(ids, skip_special_tokens=True)
        return self.backend.decode(ids)  # control pieces (EOS, PAD) decode to nothing

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
