"""SmolLM2-135M-Instruct (real pretrained weights, tied embeddings, 9 heads / 3 KV groups) in
megatron at TP=1, PP=2, TP=3 and TP=3×PP=2 equals transformers (issue 9).

One 6-process gloo world runs everything (DP fills the ranks a layout does not use):
- `megatron-reft convert verify` at TP=3×PP=2 (the CLI as a torchrun user calls it) on real
  SVAMP ReFT prompts reports ok: fp32 logits within 1e-3 and identical greedy tokens;
- at every layout, fp32 logits of 4 SVAMP ReFT prompts (exactly the prompts rollouts use) match
  transformers' within LOGIT_TOLERANCE;
- at every layout, greedy decoding through the rollout engine (KV cache, batched prompts of
  different lengths, prompts spread over the data-parallel ranks) gives exactly the tokens of
  HF `generate` for 32 new tokens (generation continues past EOS on both sides) on 8 SVAMP
  questions in SmolLM2's chat format.

TP=2 is impossible for this model (9 attention heads): the converter refuses it in one line.
"""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from dist_utils import run_distributed
from smollm2 import EOS_ID, svamp_records

LAYOUTS = [(1, 1), (1, 2), (3, 1), (3, 2)]
WORLD = 6
NEW_TOKENS = 32
LOGIT_TOLERANCE = 1e-3  # fp32; logits of this model are O(10), reductions differ in order under TP
VERIFY_TOKENS = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread_per_child():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


def _reft_prompts(count: int) -> list[str]:
    from megatron_reft.data.prompts import build_rl_prompt

    ncot = svamp_records("svamp_test_set.json", count // 2, "ncot")
    pcot = svamp_records("svamp_python_sdp.json", count - count // 2, "pcot")
    return [build_rl_prompt(r, "ncot") for r in ncot] + [build_rl_prompt(r, "pcot") for r in pcot]


def _chat_prompts(tokenizer, count: int) -> list[list[int]]:
    """SVAMP questions the way the instruct model expects them, so it answers at length."""
    records = svamp_records("svamp_test_set.json", count)
    return [tokenizer.apply_chat_template([{"role": "user", "content": r.question}],
                                          add_generation_prompt=True, tokenize=True, return_dict=False)
            for r in records]


@pytest.fixture(scope="module")
def reference(smollm2):
    """transformers' logits on the ReFT prompts and its `generate` greedy tokens on the chat prompts."""
    from transformers import AutoTokenizer

    from megatron_reft.checkpoint.verify import load_hf_model

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2.hf_dir))
    model = load_hf_model(smollm2.hf_dir, torch.float32)
    reft = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in _reft_prompts(4)]
    chat = _chat_prompts(tokenizer, 8)
    # Every prompt gets NEW_TOKENS tokens, past an EOS too (some answers are shorter), here and in
    # the engine (ignore_eos), so all 8 x 32 tokens are compared. HF generate stops only at its
    # eos_token_id: give it one the model cannot produce (ids end at vocab_size - 1).
    never = model.config.vocab_size
    with torch.no_grad():
        logits = [model(torch.tensor([ids])).logits[0] for ids in reft]
        greedy = [model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=never,
                                 pad_token_id=EOS_ID)[0, len(ids):].tolist()
                  for ids in chat]
    return dict(reft=reft, chat=chat, logits=logits, greedy=greedy)


def _verify_cli(hf_dir, ckpt, prompts) -> dict | None:
    """`megatron-reft convert verify` at TP=3 x PP=2, its JSON report on the reporting rank.
    First thing in the process: verify loads the HF model before megatron's CPU layer is in.
    The process group exists already (run_distributed made it), so verify leaves it up for
    the layouts that follow."""
    from megatron_reft.checkpoint import cli

    args = ["verify", "--hf-dir", str(hf_dir), "--ckpt", str(ckpt), "--tp", "3", "--pp", "2",
            "--new-tokens", str(VERIFY_TOKENS)]
    for prompt in prompts:
        args += ["--prompt", prompt]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(args)
    text = out.getvalue()
    return {"exit": code, **json.loads(text[text.index("{"):])} if "{" in text else None


def _layout(ckpt, tp, pp, reft, chat):
    """Logits of the ReFT prompts and greedy engine tokens for this rank's share of the chat prompts."""
    from megatron.core import parallel_state as ps

    from megatron_reft.checkpoint.io import load_checkpoint, read_model_yaml
    from megatron_reft.checkpoint.verify import megatron_logits
    from megatron_reft.distributed import init as dist_init
    from megatron_reft.engine import Engine
    from megatron_reft.generation import SamplingParams, generate

    dist_init.initialize(tp, pp, seed=1)
    model_cfg = read_model_yaml(ckpt)
    engine = Engine(model_cfg)
    load_checkpoint(ckpt, engine.module)
    engine.gpt.eval()
    dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    mine = list(range(dp_rank, len(chat), dp))
    params = SamplingParams(max_new_tokens=NEW_TOKENS, greedy=True, max_total_length=1024, ignore_eos=True)
    out = generate(engine, [chat[i] for i in mine], EOS_ID, params)
    logits = None
    if dp_rank == dp - 1:  # one model replica computes the logits (the others would repeat it)
        logits = [megatron_logits(engine.gpt, torch.tensor([ids]), model_cfg.vocab_size) for ids in reft]
    reporting = ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    return {"greedy": dict(zip(mine, out.tokens)) if reporting else {},
            "logits": [x[0] for x in logits] if reporting and logits is not None else None}


def _child(rank, world, hf_dir, ckpt, verify_prompts, reft, chat):
    torch.set_num_threads(1)
    from megatron_reft.distributed import init as dist_init

    results = {"verify": _verify_cli(hf_dir, ckpt, verify_prompts)}
    for tp, pp in LAYOUTS:
        results[(tp, pp)] = _layout(ckpt, tp, pp, reft, chat)
    dist_init.shutdown()
    return results


@pytest.fixture(scope="module")
def run(smollm2, reference):
    prompts = _reft_prompts(2)
    return run_distributed(_child, WORLD, str(smollm2.hf_dir), str(smollm2.ckpt), prompts,
                           reference["reft"], reference["chat"], timeout_s=600)


def test_convert_verify_reports_parity_at_tp3_pp2(run):
    report = run[-1]["verify"]
    assert report is not None and report["exit"] == 0, report
    assert (report["tensor_parallel"], report["pipeline_parallel"]) == (3, 2)
    assert report["ok"] and report["greedy_agree"], report
    assert report["max_abs_logit_diff"] <= 1e-3
    assert all(len(p["megatron_greedy"]) == VERIFY_TOKENS for p in report["prompts"])


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_match_transformers(run, reference, tp, pp):
    logits = [r[(tp, pp)]["logits"] for r in run if r[(tp, pp)]["logits"] is not None]
    assert len(logits) == 1, "exactly one rank (last stage, TP rank 0, last replica) reports logits"
    for ours, theirs in zip(logits[0], reference["logits"]):
        assert ours.shape == theirs.shape  # the true vocabulary: 49,152
        diff = (ours - theirs).abs().max().item()
        assert diff <= LOGIT_TOLERANCE, f"TP={tp} PP={pp}: max abs logit diff {diff}"
        assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_rollout_engine_greedy_equals_hf_generate(run, reference, tp, pp):
    greedy = {}
    for r in run:
        greedy.update(r[(tp, pp)]["greedy"])
    assert sorted(greedy) == list(range(len(reference["chat"])))
    assert any(EOS_ID in tokens for tokens in reference["greedy"]), "the comparison runs past an EOS"
    for i, expected in enumerate(reference["greedy"]):
        assert len(expected) == NEW_TOKENS
        assert greedy[i] == expected, f"TP={tp} PP={pp}: prompt {i} differs"


def test_tp2_is_refused_in_one_line(smollm2, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_reft.cli", "convert", "hf-to-megatron",
                           "--hf-dir", str(smollm2.hf_dir), "--out", str(tmp_path / "tp2"), "--tp", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("megatron-reft convert hf-to-megatron: error: --tp 2 does not divide "
                                   "9 attention heads")
    assert not (tmp_path / "tp2").exists()
