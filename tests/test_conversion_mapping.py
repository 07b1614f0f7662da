"""HF ⇄ megatron conversion without a megatron model: layouts, names, files, round trips, refusals.

(Logit parity through real megatron models at TP × PP is in test_conversion_parity.py.)
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from conversion_models import load_hf_dir, random_hf_model, save_hf

from megatron_reft.checkpoint import cli, convert, hf_llama, hf_opt
from megatron_reft.checkpoint.dist_io import DistCheckpointReader
from megatron_reft.checkpoint.hf_io import HFReader, ShardedSafetensorsWriter, parse_size
from megatron_reft.checkpoint.mapping import (UnsupportedConfig, checkpoint_key, fuse_qkv, split_qkv,
                                              to_local_name, to_te_name)
from megatron_reft.models import sharding

QUIET = dict(log=lambda *a: None)


# ---- layouts ----------------------------------------------------------------------------------

def _labelled(rows: int, offset: int) -> torch.Tensor:
    return (torch.arange(rows, dtype=torch.float32) + offset)[:, None].expand(rows, 3).clone()


def test_fused_qkv_is_grouped_per_query_group():
    heads, groups, d = 8, 2, 2  # 4 query heads per group
    q, k, v = _labelled(heads * d, 0), _labelled(groups * d, 100), _labelled(groups * d, 200)
    fused = fuse_qkv(q, k, v, heads, groups)
    expected_rows = (list(range(0, 8)) + [100, 101] + [200, 201]  # group 0: q heads 0-3, k0, v0
                     + list(range(8, 16)) + [102, 103] + [202, 203])  # group 1
    assert fused[:, 0].tolist() == expected_rows
    for a, b in zip(split_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(a, b)
    # Biases are 1-D and follow the same order.
    assert fuse_qkv(q[:, 0], k[:, 0], v[:, 0], heads, groups).tolist() == expected_rows


def test_multi_head_qkv_is_per_head_not_stacked():
    heads, d = 3, 2
    q, k, v = _labelled(heads * d, 0), _labelled(heads * d, 100), _labelled(heads * d, 200)
    fused = fuse_qkv(q, k, v, heads, heads)[:, 0].tolist()
    assert fused[:6] == [0, 1, 100, 101, 200, 201]  # [q_0, k_0, v_0], then head 1 ...


def test_tp_split_of_fused_qkv_keeps_whole_groups():
    heads, groups, d = 8, 2, 2
    q, k, v = _labelled(heads * d, 0), _labelled(groups * d, 100), _labelled(groups * d, 200)
    fused = fuse_qkv(q, k, v, heads, groups)
    rank1 = sharding.shard("decoder.layers.0.self_attention.linear_qkv.weight", fused, 1, 2, gated=False)
    assert rank1[:, 0].tolist() == list(range(8, 16)) + [102, 103, 202, 203]


# ---- names ------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", [hf_llama, hf_opt])
def test_local_and_te_names_translate_both_ways(family):
    model = family.model_config(random_hf_model("opt" if family is hf_opt else "llama_gqa").config.to_dict())
    mapping = family.mapping(model)
    local = [f"decoder.layers.3.{r.megatron}" for r in mapping.layer_rules] + [r.megatron for r in mapping.global_rules]
    te = [to_te_name(n) for n in local]
    assert [to_local_name(n) for n in te] == local
    assert "decoder.layers.3.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.3.mlp.linear_fc1.layer_norm_weight" in te
    assert not any("input_layernorm" in n or "pre_mlp_layernorm" in n for n in te)
    # Everything that is not a per-layer norm keeps its name.
    assert {n for n in local if "layernorm" not in n or "final" in n} <= set(te)
    assert checkpoint_key("decoder.layers.3.input_layernorm.weight") == (
        "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight", 3)
    assert checkpoint_key("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == (
        "model.decoder.layers.mlp.linear_fc1.layer_norm_weight", 3)  # TE names map to the same key
    assert checkpoint_key("embedding.word_embeddings.weight") == ("model.embedding.word_embeddings.weight", None)


# ---- files ------------------------------------------------------------------------------------

def test_sharded_safetensors_writer_streams_a_valid_checkpoint(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(10, 7), "b": torch.randn(33).to(torch.bfloat16), "c": torch.randn(3, 2, 5)}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, entries, max_shard_bytes=parse_size("300B"))
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(str(tmp_path / file)))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    reader = HFReader(tmp_path)
    assert reader.shape("b") == (33,) and reader.dtype("b") == torch.bfloat16
    assert torch.equal(reader.get("c"), tensors["c"])


def test_writer_refuses_tensors_out_of_plan(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [("a", (2,), torch.float32)], max_shard_bytes=10**6)
    with pytest.raises(RuntimeError, match="expected a"):
        writer.write("b", torch.zeros(2))


# ---- round trips (conversion only) -------------------------------------------------------------

@pytest.mark.parametrize("name,fmt", [("llama_gqa", "safetensors"), ("llama_mha", "bin"), ("opt", "safetensors"),
                                      ("opt", "bin")])
def test_hf_megatron_hf_round_trip_is_exact(tmp_path, name, fmt):
    src = save_hf(random_hf_model(name), tmp_path / "hf", fmt=fmt, tokenizer=True)
    ckpt = convert.hf_to_megatron(src, tmp_path / "mg", tp=2, pp=2, **QUIET)
    assert (ckpt / "tokenizer" / "tokenizer.json").is_file()
    reader = DistCheckpointReader(ckpt / "weights")
    model = convert.read_model_yaml(ckpt)
    padded = reader.shape("embedding.word_embeddings.weight")[0]
    assert padded == model.padded_vocab_size(2) and padded % 256 == 0 and padded > model.vocab_size
    back = convert.megatron_to_hf(ckpt, tmp_path / "back", max_shard_size="50KB", **QUIET)

    original, exported = _hf_tensors(src), load_hf_dir(back)
    assert sorted(original) == sorted(exported)
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    assert json.loads((src / "config.json").read_text()) == json.loads((back / "config.json").read_text())
    assert (back / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert len(list(back.glob("model-*.safetensors"))) > 1


def test_base_model_names_without_prefix_are_read(tmp_path):
    """Original OPT .bin files are saved from OPTModel: `decoder.…`, no `model.` prefix."""
    src = save_hf(random_hf_model("opt"), tmp_path / "hf", fmt="bin")
    bare = tmp_path / "bare"
    shutil.copytree(src, bare)
    index = json.loads((bare / "pytorch_model.bin.index.json").read_text())
    for file in set(index["weight_map"].values()):
        tensors = torch.load(bare / file, weights_only=True)
        torch.save({k.removeprefix("model."): v for k, v in tensors.items()}, bare / file)
    index["weight_map"] = {k.removeprefix("model."): v for k, v in index["weight_map"].items()}
    (bare / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    a = DistCheckpointReader(convert.hf_to_megatron(src, tmp_path / "a", **QUIET) / "weights")
    b = DistCheckpointReader(convert.hf_to_megatron(bare, tmp_path / "b", **QUIET) / "weights")
    for name in ("embedding.position_embeddings.weight", "decoder.layers.1.self_attention.linear_qkv.bias"):
        assert torch.equal(a.read(name), b.read(name))


def _hf_tensors(directory):
    reader = HFReader(directory)
    return {n: reader.get(n) for n in reader.names()}


def test_exported_directory_loads_in_transformers(tmp_path):
    import transformers

    hf_model = random_hf_model("opt")
    src = save_hf(hf_model, tmp_path / "hf")
    ckpt = convert.hf_to_megatron(src, tmp_path / "mg", **QUIET)
    back = convert.megatron_to_hf(ckpt, tmp_path / "back", **QUIET)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(back), attn_implementation="eager").eval()
    ids = torch.randint(0, 250, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf_model(ids).logits)


def test_dtype_is_kept_unless_asked(tmp_path):
    hf_model = random_hf_model("llama_gqa")
    src = save_hf(hf_model, tmp_path / "hf")
    ckpt = convert.hf_to_megatron(src, tmp_path / "mg", dtype=torch.bfloat16, **QUIET)
    assert DistCheckpointReader(ckpt / "weights").dtype("decoder.layers.1.mlp.linear_fc1.weight") == torch.bfloat16
    back = convert.megatron_to_hf(ckpt, tmp_path / "back", **QUIET)  # keeps bf16
    exported = load_hf_dir(back)
    original = dict(hf_model.state_dict())
    assert exported["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert torch.equal(exported["model.layers.1.mlp.up_proj.weight"],
                       original["model.layers.1.mlp.up_proj.weight"].to(torch.bfloat16))
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    fp32 = convert.megatron_to_hf(ckpt, tmp_path / "fp32", dtype=torch.float32, **QUIET)
    assert load_hf_dir(fp32)["lm_head.weight"].dtype == torch.float32


def test_checkpoint_keys_are_te_names_stacked_over_layers(tmp_path):
    src = save_hf(random_hf_model("opt"), tmp_path / "hf")
    ckpt = convert.hf_to_megatron(src, tmp_path / "mg", **QUIET)
    reader = DistCheckpointReader(ckpt / "weights")
    keys = set(reader.tensors)
    assert "model.decoder.layers.self_attention.linear_qkv.layer_norm_bias" in keys
    assert "model.decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in keys)
    assert tuple(reader.tensors["model.decoder.layers.self_attention.linear_qkv.weight"].size) == (2, 192, 64)
    # OPT's position table loses HF's two offset rows; they are kept beside the checkpoint.
    assert reader.shape("embedding.position_embeddings.weight") == (64, 64)
    assert (ckpt / "hf" / "extras.safetensors").is_file()
    assert "model.output_layer.weight" not in keys  # tied embeddings


# ---- refusals ---------------------------------------------------------------------------------

UNSUPPORTED = [
    ("opt", {"do_layer_norm_before": False}, [], "post-LayerNorm"),
    ("opt", {"word_embed_proj_dim": 32}, [], "word_embed_proj_dim"),
    ("opt", {"activation_function": "gelu_new"}, [], "activation_function"),
    ("opt", {"enable_bias": False}, [], "enable_bias"),
    ("llama_gqa", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, [], "RoPE scaling"),
    ("llama_gqa", {"attention_bias": True}, [], "attention_bias"),
    ("llama_gqa", {"hidden_act": "gelu"}, [], "hidden_act"),
    ("llama_gqa", {"model_type": "gemma2"}, [], "model_type 'gemma2'"),
    ("llama_gqa", {}, ["--tp", "3"], "--tp 3 does not divide 8 attention heads"),
    ("llama_mha", {}, ["--pp", "3"], "--pp 3 does not divide 2 layers"),
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {name: save_hf(random_hf_model(name), root / name) for name in ("opt", "llama_gqa", "llama_mha")}


@pytest.mark.parametrize("name,patch,extra_args,message", UNSUPPORTED)
def test_unsupported_configs_fail_clearly_and_write_nothing(tmp_path, capsys, saved, name, patch, extra_args,
                                                            message):
    src = tmp_path / "hf"
    shutil.copytree(saved[name], src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **patch}))
    out = tmp_path / "out"
    argv = ["hf-to-megatron", "--hf-dir", str(src), "--out", str(out)] + extra_args
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "out.tmp").exists()


def test_unknown_tensors_are_refused(tmp_path, saved, capsys):
    from safetensors.torch import save_file

    src = tmp_path / "hf"
    shutil.copytree(saved["opt"], src)
    save_file({"model.decoder.project_in.weight": torch.zeros(64, 64)}, str(src / "extra.safetensors"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.decoder.project_in.weight"] = "extra.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert cli.main(["hf-to-megatron", "--hf-dir", str(src), "--out", str(tmp_path / "out")]) == 2
    assert "project_in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_not_overwritten(tmp_path, saved, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    assert cli.main(["hf-to-megatron", "--hf-dir", str(saved["opt"]), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep").is_file()


def test_model_config_mapping_reads_both_rope_styles():
    hf = random_hf_model("llama_gqa").config.to_dict()
    assert hf_llama.model_config(hf).rope_theta == 1e6
    old_style = {k: v for k, v in hf.items() if k != "rope_parameters"} | {"rope_theta": 1e6, "rope_scaling": None}
    assert hf_llama.model_config(old_style).rope_theta == 1e6
    with pytest.raises(UnsupportedConfig, match="RoPE scaling 'linear'"):
        hf_llama.model_config(old_style | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    opt = hf_opt.model_config(random_hf_model("opt").config.to_dict() | {"activation_function": "relu"})
    assert opt.activation == "relu" and opt.tie_embeddings and opt.family == "opt"
