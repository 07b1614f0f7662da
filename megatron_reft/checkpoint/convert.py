"""Hugging Face ⇄ megatron-reft checkpoint conversion, one process, one tensor (or layer) at a time.

hf_to_megatron writes a checkpoint directory in checkpoint/io.py's layout:
    model.yaml          ModelConfig from the HF config (true vocabulary size) — training needs no model flags
    tokenizer/          the HF tokenizer files
    weights/            torch_dist weights (dist_io), loadable at any TP × PP
    hf/config.json      the source config (and generation_config.json), so an export gives it back unchanged
    hf/extras.safetensors  HF tensor content megatron has no place for (OPT's two offset position rows)
    conversion.json     source, dtype and the intended TP × PP

The torch_dist format does not depend on the layout: `--tp/--pp` are validated and recorded, and
only decide how far the vocabulary is padded (`make_vocab_size_divisible_by × TP`). Loading at
another TP × PP works anyway (dist_checkpointing reshards; a different vocabulary padding is
zero-filled or cut on load).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from megatron_reft.checkpoint import hf_llama, hf_opt
from megatron_reft.checkpoint.dist_io import DistCheckpointReader, DistCheckpointWriter
from megatron_reft.checkpoint.hf_io import (HFReader, ShardedSafetensorsWriter, copy_tokenizer,
                                            parse_size, read_config)
from megatron_reft.checkpoint.io import read_model_yaml, write_model_yaml
from megatron_reft.checkpoint.mapping import FamilyMapping, UnsupportedConfig, check
from megatron_reft.models import sharding
from megatron_reft.models.families import ModelConfig, as_dict

FAMILIES = {"llama": hf_llama, "opt": hf_opt}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
HF_SIDE_FILES = ("config.json", "generation_config.json")


def family_for_hf(hf: dict):
    model_type = hf.get("model_type")
    for module in FAMILIES.values():
        if model_type in module.MODEL_TYPES:
            return module
    supported = ", ".join(t for module in FAMILIES.values() for t in module.MODEL_TYPES)
    raise UnsupportedConfig(f"model_type {model_type!r} is not supported (supported: {supported})")


def check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    """The TP × PP a megatron GPTModel of this shape can be built with (megatron-core 0.16)."""
    check(tp >= 1 and pp >= 1, f"--tp and --pp must be >= 1 (got {tp}, {pp})")
    heads, groups = model.num_attention_heads, model.num_query_groups
    check(heads % tp == 0, f"--tp {tp} does not divide {heads} attention heads")
    check(groups % tp == 0 or tp % groups == 0,
          f"--tp {tp} must divide, or be a multiple of, {groups} key/value groups")
    check(model.ffn_hidden_size % tp == 0, f"--tp {tp} does not divide ffn size {model.ffn_hidden_size}")
    check(model.num_layers % pp == 0, f"--pp {pp} does not divide {model.num_layers} layers")


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {name!r} (choose from {', '.join(DTYPES)})")
    return DTYPES[name]


def _check_hf_tensors(mapping: FamilyMapping, reader: HFReader) -> None:
    """Every tensor the mapping needs is there, and nothing unknown is (e.g. OPT's project_in)."""
    expected = set(mapping.hf_names())
    present = set(reader.names())
    missing = sorted(expected - present)
    unknown = sorted(n for n in present - expected if not mapping.is_ignored(n))
    check(not missing, f"{reader.dir}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    check(not unknown, f"{reader.dir}: tensors this model cannot represent: {unknown[:4]}"
                       f"{' ...' if len(unknown) > 4 else ''}")


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


# ---- Hugging Face → megatron ------------------------------------------------------------------

def hf_to_megatron(hf_dir: str | Path, out: str | Path, *, tp: int = 1, pp: int = 1,
                   dtype: torch.dtype | None = None, overwrite: bool = False, log=print) -> Path:
    """Convert a Hugging Face checkpoint directory into a megatron-reft checkpoint directory.

    Everything is validated before anything is written; a failure leaves no output behind.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    hf = read_config(hf_dir)
    family = family_for_hf(hf)
    model = family.model_config(hf)
    check_layout(model, tp, pp)
    reader = HFReader(hf_dir)
    mapping = family.mapping(model)
    _check_hf_tensors(mapping, reader)
    dtype = dtype or reader.dtype(mapping.embedding_rules[0].hf[0])
    tmp = _prepare_out(out, overwrite)
    try:
        log(f"converting {hf_dir} ({model.family}, {model.num_layers} layers, {reader.format}) "
            f"to {out} ({dtype}, intended TP={tp} PP={pp})")
        _write_megatron_weights(reader, mapping, tmp / "weights", tp, dtype, log)
        write_model_yaml(tmp, model)
        _write_hf_side(hf_dir, tmp, family.hf_extras(reader.get))
        if not copy_tokenizer(hf_dir, tmp / "tokenizer"):
            log(f"warning: no tokenizer files in {hf_dir}; the checkpoint has no tokenizer/")
        else:
            _log_tokenizer_ids(tmp / "tokenizer", log)
        (tmp / "conversion.json").write_text(json.dumps({
            "source": str(hf_dir.resolve()), "format": reader.format, "dtype": str(dtype).split(".")[-1],
            "tensor_parallel": tp, "pipeline_parallel": pp,
            "padded_vocab_size": model.padded_vocab_size(tp)}, indent=1) + "\n")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        reader.close()
    return out


def _megatron_tensor(rule, name: str, read, model: ModelConfig, tp: int, dtype) -> torch.Tensor:
    tensor = rule.to_megatron(*[read(n) for n in rule.hf]).to(dtype)
    if sharding.kind(name) == "vocab":  # pad rows like a model built at this TP
        tensor = sharding.shard(name, tensor, 0, 1, gated=False, padded_vocab=model.padded_vocab_size(tp))
    return tensor.contiguous()


def _write_megatron_weights(reader: HFReader, mapping: FamilyMapping, weights_dir: Path, tp: int,
                            dtype, log) -> None:
    model = mapping.model
    writer = DistCheckpointWriter(weights_dir, model.num_layers)
    writer.write_part({r.megatron: _megatron_tensor(r, r.megatron, reader.get, model, tp, dtype)
                       for r in mapping.embedding_rules})
    for i in range(model.num_layers):
        read = lambda n, i=i: reader.get(mapping.hf_layer_name(i, n))  # noqa: E731
        tensors = {}
        for rule in mapping.layer_rules:
            name = f"decoder.layers.{i}.{rule.megatron}"
            tensors[name] = _megatron_tensor(rule, name, read, model, tp, dtype)
        writer.write_part(tensors, layer=i)
        del tensors  # before the next layer is read: one layer in memory at a time
        log(f"  layer {i + 1}/{model.num_layers}")
    writer.write_part({r.megatron: _megatron_tensor(r, r.megatron, reader.get, model, tp, dtype)
                       for r in mapping.final_rules})
    writer.finish()


def _write_hf_side(hf_dir: Path, out: Path, extras: dict) -> None:
    (out / "hf").mkdir()
    for name in HF_SIDE_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, out / "hf" / name)
    if extras:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in extras.items()}, str(out / "hf" / "extras.safetensors"))


# ---- megatron → Hugging Face ------------------------------------------------------------------

def megatron_to_hf(ckpt: str | Path, out: str | Path, *, dtype: torch.dtype | None = None,
                   max_shard_size: str | int = "5GB", source: str | Path | None = None,
                   overwrite: bool = False, log=print) -> Path:
    """Export a megatron-reft checkpoint (saved at any TP × PP) as a Hugging Face directory.

    `source`: where the HF side files come from when the checkpoint has no `hf/` of its own (a
    training checkpoint): the converted checkpoint it descends from, or the original HF directory.
    Without either, a config is made from model.yaml. The value head, when the checkpoint has
    one, goes to `value_head.safetensors` beside the model.
    """
    ckpt, out = Path(ckpt), Path(out)
    model = read_model_yaml(ckpt)
    family = FAMILIES[model.family]
    side = _hf_side(ckpt, source, family, log)
    mapping = family.mapping(model, side["extras"])
    reader = DistCheckpointReader(ckpt / "weights")
    _check_megatron_tensors(mapping, reader)
    dtype = dtype or reader.dtype("embedding.word_embeddings.weight")
    plan = list(_export_plan(mapping, reader))
    entries = [(hf_name, shape, dtype) for _, _, hf_names_shapes in plan for hf_name, shape in hf_names_shapes]
    tmp = _prepare_out(out, overwrite)
    try:
        log(f"exporting {ckpt} ({model.family}, {model.num_layers} layers) to {out} ({dtype})")
        writer = ShardedSafetensorsWriter(tmp, entries, parse_size(max_shard_size))
        for rule, name, hf_names_shapes in plan:
            tensor = reader.read(name)
            if sharding.kind(name) == "vocab":
                tensor = tensor[:model.vocab_size]  # drop the TP padding rows
            for (hf_name, _), hf_tensor in zip(hf_names_shapes, rule.to_hf(tensor.to(dtype))):
                writer.write(hf_name, hf_tensor.to(dtype))
            del tensor, hf_tensor  # before the next read: one tensor in memory at a time
        writer.close()
        _write_hf_config(side, tmp, model, family, dtype)
        if not ((ckpt / "tokenizer").is_dir() and copy_tokenizer(ckpt / "tokenizer", tmp)):
            log(f"warning: {ckpt} has no tokenizer/; the export has no tokenizer")
        _export_value_head(reader, tmp)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _log_tokenizer_ids(directory: Path, log) -> None:
    """One line with the EOS/pad ids training will use (Galactica's tokenizer defines no EOS: the
    loader then takes id 2, as the reference does); a tokenizer training cannot use is reported,
    not fatal - the weights convert either way."""
    from megatron_reft.data.tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(str(directory))
    except (ValueError, OSError) as error:
        log(f"warning: tokenizer: {error}")
        return
    log(f"tokenizer: {tok.kind}, vocabulary {tok.vocab_size}, EOS id {tok.eos_id}, pad id {tok.pad_id}")


def _hf_side(ckpt: Path, source, family, log) -> dict:
    """HF config, generation config and extras: from ckpt/hf, else source/hf, else an HF `source`."""
    from safetensors.torch import load_file

    candidates = [ckpt / "hf"] + ([Path(source) / "hf", Path(source)] if source else [])
    for side in candidates:
        if (side / "config.json").is_file():
            if (side.parent / "model.yaml").is_file() and side.name == "hf":  # a checkpoint's hf/
                extras_file = side / "extras.safetensors"
                extras = load_file(str(extras_file)) if extras_file.is_file() else {}
            else:  # an original HF directory: take the extras from its weights
                extras = family.hf_extras(HFReader(side).get)
            generation = side / "generation_config.json"
            return {"config": read_config(side), "extras": extras,
                    "generation": generation if generation.is_file() else None}
    log(f"note: no HF config for {ckpt} (pass --source); making one from model.yaml")
    return {"config": None, "extras": {}, "generation": None}


def _megatron_names(mapping: FamilyMapping):
    """(rule, megatron name, HF names) in writing order: embeddings, layers, final norm/output."""
    for rule in mapping.embedding_rules:
        yield rule, rule.megatron, rule.hf
    for i in range(mapping.model.num_layers):
        for rule in mapping.layer_rules:
            yield rule, f"decoder.layers.{i}.{rule.megatron}", tuple(mapping.hf_layer_name(i, n) for n in rule.hf)
    for rule in mapping.final_rules:
        yield rule, rule.megatron, rule.hf


def _check_megatron_tensors(mapping: FamilyMapping, reader: DistCheckpointReader) -> None:
    missing = [name for _, name, _ in _megatron_names(mapping) if not reader.has(name)]
    if missing:
        raise RuntimeError(f"{reader.dir}: checkpoint lacks {missing[:4]}")


def _export_plan(mapping: FamilyMapping, reader: DistCheckpointReader):
    """HF names and shapes for every megatron tensor, found by running the mapping on meta tensors."""
    for rule, name, hf_names in _megatron_names(mapping):
        shape = list(reader.shape(name))
        if sharding.kind(name) == "vocab":
            shape[0] = mapping.model.vocab_size
        hf_shapes = [tuple(t.shape) for t in rule.to_hf(torch.empty(shape, device="meta"))]
        yield rule, name, list(zip(hf_names, hf_shapes))


def _same_model(a: ModelConfig, b: ModelConfig) -> bool:
    skip = ("preset", "init_std", "make_vocab_size_divisible_by")
    da, db = as_dict(a), as_dict(b)
    return all(da[k] == db[k] for k in da if k not in skip)


def _write_hf_config(side: dict, out: Path, model: ModelConfig, family, dtype) -> None:
    """The source HF config when it still describes this model, else a fresh one."""
    config = side["config"]
    if config is None or not _same_model(family.model_config(config), model):
        config = family.hf_config(model)
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = str(dtype).split(".")[-1]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if side["generation"] is not None:
        shutil.copy2(side["generation"], out / "generation_config.json")


def _export_value_head(reader: DistCheckpointReader, out: Path) -> None:
    if not reader.has("value_head.weight"):
        return
    from safetensors.torch import save_file

    head = {"weight": reader.read("value_head.weight"), "bias": reader.read("value_head.bias")}
    save_file(head, str(out / "value_head.safetensors"),
              metadata={"format": "pt", "module": "torch.nn.Linear(hidden_size, 1) on the final hidden state"})
