"""Conversion speed and memory on a CodeLlama-7B-shaped checkpoint (random bf16 weights).

    python benchmarks/conversion.py [--dir runs/bench_conversion] [--shard-size 5GB] [--keep]

1. writes a Hugging Face checkpoint with CodeLlama-7B's shapes (32 layers, hidden 4096, ffn 11008,
   vocab 32,016, untied output) as bf16 sharded safetensors, one tensor at a time;
2. `megatron-reft convert hf-to-megatron --tp 2 --pp 1` in a subprocess;
3. `megatron-reft convert megatron-to-hf` in another subprocess;
4. spot-checks that tensors came back bit-identical, prints JSON (seconds and peak resident
   memory per direction, against the largest shard and the model size) and deletes the files.

Peak memory is each conversion process's own high-water resident set (VmHWM), with a 0.1 s
psutil poll of its process tree as a cross-check.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CODELLAMA_7B = dict(vocab_size=32016, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=16384,
                    rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False)
GIB = 1024 ** 3


def hf_tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                   (p + "mlp.down_proj.weight", (h, f))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def random_tensor(name: str, shape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def make_hf_checkpoint(directory: Path, cfg: dict, shard_size: str) -> dict:
    """Streams random tensors into sharded safetensors (never the whole model in memory)."""
    from transformers import LlamaConfig

    from megatron_reft.checkpoint.hf_io import ShardedSafetensorsWriter, parse_size

    directory.mkdir(parents=True)
    LlamaConfig(**cfg, dtype="bfloat16", architectures=["LlamaForCausalLM"]).save_pretrained(directory)
    shapes = hf_tensor_shapes(cfg)
    writer = ShardedSafetensorsWriter(directory, [(n, s, torch.bfloat16) for n, s in shapes],
                                      parse_size(shard_size))
    for name, shape in shapes:
        writer.write(name, random_tensor(name, shape))
    writer.close()
    files = list(directory.glob("*.safetensors"))
    return {"model_bytes": sum(f.stat().st_size for f in files),
            "largest_shard_bytes": max(f.stat().st_size for f in files), "shards": len(files)}


# Runs the CLI in-process and reports the process's own high-water mark. VmHWM is per address
# space, so unlike ru_maxrss it does not inherit the (larger) benchmark parent's resident set
# across fork + exec.
MEASURED = ("import sys\nfrom megatron_reft.checkpoint.cli import main\nrc = main(sys.argv[1:])\n"
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "print('VMHWM_KIB', hwm)\nsys.exit(rc)")


def run_measured(cli_args: list[str]) -> dict:
    """Run a convert command in a fresh process: wall seconds and peak resident memory
    (its VmHWM, cross-checked by polling the process tree's RSS every 0.1 s)."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", MEASURED] + cli_args,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    polled = {"peak": 0}
    done = threading.Event()

    def poll():
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                rss = parent.memory_info().rss + sum(c.memory_info().rss for c in parent.children(True))
                polled["peak"] = max(polled["peak"], rss)
            except psutil.Error:
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    output = proc.stdout.read().decode(errors="replace")
    proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"convert {' '.join(cli_args)} failed:\n{output[-3000:]}")
    hwm = int(output.split("VMHWM_KIB")[-1].split()[0]) * 1024
    return {"seconds": round(seconds, 1), "peak_rss_gib": round(hwm / GIB, 2),
            "polled_peak_rss_gib": round(polled["peak"] / GIB, 2), "peak_rss_bytes": hwm}


def spot_check(original: Path, exported: Path, names: list[str]) -> bool:
    from megatron_reft.checkpoint.hf_io import HFReader

    a, b = HFReader(original), HFReader(exported)
    return all(torch.equal(a.get(n), b.get(n)) for n in names)


def baseline_rss() -> float:
    """Peak resident memory of a Python that has only imported what the converter imports."""
    code = ("import megatron_reft.checkpoint.convert, torch.distributed.checkpoint, safetensors.torch\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    return round(int(subprocess.check_output([sys.executable, "-c", code]).split()[-1]) * 1024 / GIB, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=str(REPO / "runs" / "bench_conversion"))
    parser.add_argument("--shard-size", default="5GB", help="HF shard size of the source checkpoint")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers for a quick run")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args(argv)

    cfg = dict(CODELLAMA_7B)
    if args.num_layers:
        cfg["num_hidden_layers"] = args.num_layers
    root = Path(args.dir)
    shutil.rmtree(root, ignore_errors=True)
    hf, mg, back = root / "hf", root / "megatron_tp2", root / "hf_back"
    try:
        t0 = time.perf_counter()
        source = make_hf_checkpoint(hf, cfg, args.shard_size)
        source["write_seconds"] = round(time.perf_counter() - t0, 1)
        to_megatron = run_measured(["hf-to-megatron", "--hf-dir", str(hf), "--out", str(mg),
                                    "--tp", "2", "--pp", "1"])
        to_hf = run_measured(["megatron-to-hf", "--ckpt", str(mg), "--out", str(back),
                              "--max-shard-size", args.shard_size])
        last = cfg["num_hidden_layers"] - 1
        checked = ["model.embed_tokens.weight", "model.layers.0.self_attn.k_proj.weight",
                   f"model.layers.{last}.mlp.gate_proj.weight", f"model.layers.{last}.mlp.up_proj.weight",
                   "lm_head.weight"]
        report = {
            "benchmark": "conversion", "date": datetime.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "memory_gib": round(_total_memory() / GIB, 1),
                        "platform": platform.platform(), "torch": torch.__version__},
            "model": "CodeLlama-7B shapes, random bf16" + (f", {args.num_layers} layers" if args.num_layers else ""),
            "source": {**source, "model_gib": round(source["model_bytes"] / GIB, 2),
                       "largest_shard_gib": round(source["largest_shard_bytes"] / GIB, 2)},
            "python_baseline_rss_gib": baseline_rss(),
            "hf_to_megatron_tp2": to_megatron, "megatron_to_hf": to_hf,
            "round_trip_tensors_identical": spot_check(hf, back, checked),
        }
        for key in ("hf_to_megatron_tp2", "megatron_to_hf"):
            peak = report[key].pop("peak_rss_bytes")
            report[key]["peak_over_largest_shard"] = round(peak / source["largest_shard_bytes"], 2)
            report[key]["peak_over_model"] = round(peak / source["model_bytes"], 3)
        print(json.dumps(report, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _total_memory() -> int:
    import psutil

    return psutil.virtual_memory().total


if __name__ == "__main__":
    sys.exit(main())
