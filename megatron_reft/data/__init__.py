"""Records, loaders, prompts (reft.md §2), tokenizers, the synthetic task and resumable batching.

See docs/data.md for the formats, the exact prompt/target strings and the malformed-record policy.
Names are imported lazily so that `from megatron_reft.data import Record` does not pull in torch
(the `score` command stays fast).
"""
import importlib

_EXPORTS = {
    "batching": ["ResumableBatchSampler", "collate_sft", "eval_shard", "padding_fraction", "plan_micro_batches"],
    "loaders": ["load_records", "save_records", "split_gsm8k_solution", "parse_hf_spec"],
    "prompts": ["ANSWER_TRIGGER", "COT_TRIGGER", "INSTRUCTION", "OverlongError", "SFTExample", "build_prompt",
                "build_rl_prompt", "build_target", "encode_rl_prompt", "encode_rl_prompts", "encode_sft",
                "encode_pcot_prefill", "encode_sft_records", "full_program", "ncot_target", "pcot_prefill"],
    "records": ["LoadReport", "MalformedRecordError", "Record", "parse_choices", "parse_number"],
    "synthetic": ["Difficulty", "LEVELS", "make_synthetic_records", "make_synthetic_splits",
                  "train_synthetic_tokenizer"],
    "tokenizer": ["Tokenizer", "load_tokenizer"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name):
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
