"""Tiny random Hugging Face models for the conversion tests (made here, nothing downloaded).

Every parameter is random — biases and norm weights included, which HF initialises to 0 / 1 — so
a lost bias, a swapped norm or a mis-ordered QKV changes the logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

VOCABS = {"llama_gqa": 300, "llama_mha": 257, "opt": 250, "llama3": 280, "mistral": 260,
          "qwen2_tied": 270, "qwen2_untied": 290}


def hf_config(name: str):
    import transformers as T

    if name == "llama_gqa":  # grouped-query attention, CodeLlama's RoPE theta
        return T.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
                             rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if name == "llama_mha":
        return T.LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                             rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=False)
    if name == "opt":  # Galactica-like: pre-LN, biases, exact GELU, tied embeddings
        return T.OPTConfig(vocab_size=250, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=64, activation_function="gelu",
                           do_layer_norm_before=True, word_embed_proj_dim=64, enable_bias=True,
                           tie_word_embeddings=True, dropout=0.0, attention_dropout=0.0)
    if name == "llama3":  # Llama-3.x RoPE scaling; original context 64 puts one frequency in each band
        return T.LlamaConfig(vocab_size=280, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             rope_scaling=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0, original_max_position_embeddings=64),
                             rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=False)
    if name == "mistral":  # window longer than any test sequence: windowed attention = full attention
        return T.MistralConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               sliding_window=96, rope_theta=1e6, rms_norm_eps=1e-5)
    if name.startswith("qwen2"):  # Q/K/V biases; Qwen2.5-0.5B ties embeddings, 7B does not
        return T.Qwen2Config(vocab_size=VOCABS[name], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=name == "qwen2_tied")
    raise KeyError(name)


def random_hf_model(name: str, seed: int = 0):
    import transformers as T

    config = hf_config(name)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname and pname.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:  # large enough that greedy continuations vary and are not near-ties
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model


def save_hf(model, directory: Path, *, fmt: str = "safetensors", shard: str = "60KB",
            tokenizer: bool = False) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory, max_shard_size=shard)
    if fmt == "bin":
        _to_bin_shards(directory)
    if tokenizer:
        make_tokenizer(directory, model.config.vocab_size)
    return directory


def _to_bin_shards(directory: Path) -> None:
    """Rewrite a safetensors checkpoint as sharded pytorch_model-*.bin (what older HF repos ship)."""
    from safetensors.torch import load_file

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    weight_map = {}
    files = sorted(set(index["weight_map"].values()))
    for i, file in enumerate(files):
        tensors = load_file(str(directory / file))
        bin_name = f"pytorch_model-{i + 1:05d}-of-{len(files):05d}.bin"
        torch.save(tensors, directory / bin_name)
        weight_map.update({k: bin_name for k in tensors})
        (directory / file).unlink()
    (directory / "model.safetensors.index.json").unlink()
    (directory / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))


def make_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over made-up words, saved like an HF tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(directory))


def load_hf_dir(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(directory).glob("model*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@torch.no_grad()
def hf_reference(model, ids: torch.Tensor, new_tokens: int):
    """Logits and greedy continuation, with the smallest top-1/top-2 gap met on the way
    (a near-tie would make a greedy comparison meaningless)."""
    logits = model(ids).logits.float()
    seq, min_gap = ids, float("inf")
    for _ in range(new_tokens):
        last = model(seq).logits[:, -1].float()
        top2 = last.topk(2, dim=-1).values
        min_gap = min(min_gap, (top2[:, 0] - top2[:, 1]).min().item())
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return logits, seq[:, ids.shape[1]:], min_gap
