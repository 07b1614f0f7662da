"""Converted checkpoints in real megatron models at TP ∈ {1, 2} × PP ∈ {1, 2} (gloo processes).

For llama with and without grouped-query attention, OPT (biases, tied embeddings), Llama-3
(RoPE scaling), Mistral and Qwen2 (Q/K/V biases, tied and untied embeddings):
megatron logits equal Hugging Face's (fp32, max abs diff ≤ 1e-4) and greedy continuations are
identical; the converter writes exactly the keys/shapes a model saved at that layout writes;
a checkpoint resharded TP=2×PP=1 → TP=1×PP=2 keeps its logits; and HF → megatron → a TP=2×PP=2
model → save → HF gives back identical tensors and config.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conversion_models import VOCABS, hf_reference, load_hf_dir, random_hf_model, save_hf
from dist_utils import run_distributed

from megatron_reft.checkpoint import convert
from megatron_reft.checkpoint.dist_io import DistCheckpointReader

MODELS = ("llama_gqa", "llama_mha", "opt", "llama3", "mistral", "qwen2_tied", "qwen2_untied")
LAYOUTS = [(1, 1), (1, 2), (2, 1), (2, 2)]
WORLD = 4  # every layout runs in one 4-process world (DP fills the rest): one start-up for all
NEW_TOKENS = 6
QUIET = dict(log=lambda *a: None)


def _ids(name: str) -> torch.Tensor:
    return torch.randint(0, VOCABS[name], (2, 10), generator=torch.Generator().manual_seed(7))


def _steps(root):
    """(label, TP, PP, checkpoint per model, directory to save the loaded model to or None)."""
    steps = []
    for tp, pp in LAYOUTS:
        label = f"tp{tp}pp{pp}"
        resave = (tp, pp) in ((2, 1), (2, 2))
        steps.append((label, tp, pp, {n: root / f"{n}_{label}" for n in MODELS},
                      {n: root / f"saved_{n}_{label}" for n in MODELS} if resave else None))
    # Resharding: what the TP=2 x PP=1 model saved, loaded at TP=1 x PP=2.
    steps.append(("reshard", 1, 2, {n: root / f"saved_{n}_tp2pp1" for n in MODELS}, None))
    return steps


def _child(rank, world, steps):
    """Each step: load every model's checkpoint at TP x PP; logits + greedy (kept on the last rank,
    a last pipeline stage for every layout); optionally save the loaded model (with a value head)
    with checkpoint/io.py's save_checkpoint."""
    torch.set_num_threads(1)
    from megatron_reft.checkpoint.io import load_checkpoint, read_model_yaml, save_checkpoint
    from megatron_reft.checkpoint.verify import megatron_greedy, megatron_logits
    from megatron_reft.distributed import init as dist_init
    from megatron_reft.models.build import build_model, reset_value_head

    results = {}
    for label, tp, pp, ckpts, resave in steps:
        dist_init.initialize(tp, pp, seed=1)
        results[label] = {}
        for name in MODELS:
            model_cfg = read_model_yaml(ckpts[name])
            gpt = build_model(model_cfg, with_value_head=resave is not None)
            load_checkpoint(ckpts[name], gpt)
            gpt.eval()
            ids = _ids(name)
            results[label][name] = (megatron_logits(gpt, ids, model_cfg.vocab_size),
                                    megatron_greedy(gpt, ids, model_cfg.vocab_size, NEW_TOKENS),
                                    _rollout_engine_greedy(gpt, model_cfg, ids))
            if resave is not None:
                reset_value_head(gpt, seed=3)
                save_checkpoint(resave[name], gpt, model_cfg, update_latest=False)
    dist_init.shutdown()
    return results if rank == world - 1 else None


def _rollout_engine_greedy(gpt, model_cfg, ids: torch.Tensor) -> torch.Tensor:
    """The rollout engine (KV cache, its own position bookkeeping) decoding greedily: it must apply
    the same positions (RoPE scaling included) as the full forward."""
    from types import SimpleNamespace

    from megatron_reft.generation import SamplingParams, generate

    params = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True, max_total_length=ids.shape[1] + NEW_TOKENS,
                            stop_at_eos=False)
    out = generate(SimpleNamespace(gpt=gpt, model_config=model_cfg), ids.tolist(), eos_id=-1, params=params)
    return torch.tensor(out.tokens)


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_child():
    """Spawned ranks inherit this; they also call torch.set_num_threads(1) themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """HF models, their directories and reference outputs."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in MODELS:
        model = random_hf_model(name)
        directory = save_hf(model, root / name, tokenizer=name == "llama_gqa")
        logits, greedy, gap = hf_reference(model, _ids(name), NEW_TOKENS)
        assert gap > 1e-3, f"{name}: near-tie in the greedy reference; pick another seed"
        out[name] = dict(dir=directory, logits=logits, greedy=greedy)
    return out


@pytest.fixture(scope="module")
def run(hf, tmp_path_factory):
    """Convert every model for every layout (--tp/--pp as given), then the one distributed run."""
    root = tmp_path_factory.mktemp("mg")
    steps = _steps(root)
    for label, tp, pp, ckpts, _ in steps:
        if label != "reshard":
            for name, path in ckpts.items():
                convert.hf_to_megatron(hf[name]["dir"], path, tp=tp, pp=pp, **QUIET)
    results = run_distributed(_child, WORLD, steps, timeout_s=500, init_process_group=False)[-1]
    return {"results": results, "steps": {s[0]: s for s in steps}}


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_megatron_logits_and_greedy_match_hf(run, hf, tp, pp):
    for name in MODELS:
        logits, greedy, rollout = run["results"][f"tp{tp}pp{pp}"][name]
        diff = (logits - hf[name]["logits"]).abs().max().item()
        assert diff <= 1e-4, f"{name} TP={tp} PP={pp}: max abs logit diff {diff}"
        assert torch.equal(greedy, hf[name]["greedy"]), f"{name} TP={tp} PP={pp}: greedy differs"
        assert torch.equal(rollout, hf[name]["greedy"]), f"{name} TP={tp} PP={pp}: rollout engine differs"


@pytest.mark.parametrize("label", ["tp2pp1", "tp2pp2"])
def test_converter_writes_what_a_model_saves(run, label):
    """Same keys, global shapes and dtypes as save_checkpoint from a model at that layout."""
    _, _, _, converted, saved = run["steps"][label]
    for name in MODELS:
        ours = DistCheckpointReader(converted[name] / "weights").metadata.state_dict_metadata
        theirs = DistCheckpointReader(saved[name] / "weights").metadata.state_dict_metadata
        theirs = {k: v for k, v in theirs.items() if "value_head" not in k}
        assert sorted(ours) == sorted(theirs), name
        for key, meta in theirs.items():
            if hasattr(meta, "size"):
                assert (meta.size, meta.properties.dtype) == (ours[key].size, ours[key].properties.dtype), key


def test_reshard_tp2_pp1_to_tp1_pp2_keeps_logits(run, hf):
    for name in MODELS:
        before, after = run["results"]["tp2pp1"][name], run["results"]["reshard"][name]
        assert (after[0] - before[0]).abs().max().item() <= 1e-5, name
        assert (after[0] - hf[name]["logits"]).abs().max().item() <= 1e-4, name
        assert torch.equal(after[1], hf[name]["greedy"]), name


@pytest.mark.parametrize("name", MODELS)
def test_round_trip_through_tp2_pp2_model_is_exact(run, hf, tmp_path, name):
    """HF → megatron (TP=2, PP=2) → loaded and saved by a TP=2×PP=2 model → HF."""
    _, _, _, converted, saved = run["steps"]["tp2pp2"]
    source = converted[name]  # the saved checkpoint has no hf/ side files: a training checkpoint
    back = convert.megatron_to_hf(saved[name], tmp_path / "back", source=source, max_shard_size="40KB", **QUIET)
    original, exported = load_hf_dir(hf[name]["dir"]), load_hf_dir(back)
    assert sorted(original) == sorted(exported)
    for key in original:
        assert torch.equal(original[key], exported[key]), key
    assert json.loads((hf[name]["dir"] / "config.json").read_text()) == json.loads((back / "config.json").read_text())
    from safetensors.torch import load_file

    head = load_file(str(back / "value_head.safetensors"))
    assert head["weight"].shape == (1, 64) and head["bias"].shape == (1,)


def test_export_without_source_makes_a_loadable_config(run, hf, tmp_path):
    """A training checkpoint exported without --source still gives an equivalent HF model."""
    import transformers

    saved = run["steps"]["tp2pp2"][4]
    for name in ("llama_gqa", "opt", "llama3", "mistral", "qwen2_tied"):
        back = convert.megatron_to_hf(saved[name], tmp_path / name, **QUIET)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(back), attn_implementation="eager").eval()
        with torch.no_grad():
            diff = (model(_ids(name)).logits - hf[name]["logits"]).abs().max().item()
        assert diff <= 1e-5, name


def test_verify_command_reports_agreement(run, hf):
    """`megatron-reft convert verify` end to end (its own process: it starts megatron)."""
    ckpt = run["steps"]["tp1pp1"][3]["llama_gqa"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "megatron_reft.checkpoint.cli", "verify", "--hf-dir",
                           str(hf["llama_gqa"]["dir"]), "--ckpt", str(ckpt), "--prompt", "w5 w9 w17 w3",
                           "--prompt", "w100 w42", "--new-tokens", "4"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["ok"] and report["greedy_agree"] and report["max_abs_logit_diff"] <= 1e-4
    assert report["prompts"][0]["tokens"] == 4  # the checkpoint's tokenizer was used
