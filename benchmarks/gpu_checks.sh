#!/usr/bin/env bash
# Issue 15 §6 on one GPU, as one call: the CUDA tests, a smoke run of every benchmark path at a
# tiny shape, then generation.py and ppo_step.py at llama-1b, the decode-overhead stand-in,
# generation.py at codellama-7b, a cut-down quickstart and the ppo_step.py scaling sweep. Each
# step has its own time limit; JSON lands in $OUT (or ./gpu_out).
#
#   bash benchmarks/gpu_checks.sh                  # on the GPU machine (megatron-core importable)
#   SMALL=1 bash benchmarks/gpu_checks.sh          # the same commands at CPU-sized shapes (a dry run)
#
# On the project's lent H200 megatron-core travels as a wheel (see docs/benchmarks.md).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
PY=${PY:-python3}
LOG=$OUT/stderr.log

if [ "${SMALL:-0}" = 1 ]; then
  BIG=cpu-small HUGE=cpu-small GEN="--batch 4 --prompt-len 8 --new-tokens 8 --repeats 1"
  PPO="--batch 4 --prompt-len 8 --new-tokens 8 --repeats 1"
  SWEEP="--batches 2,4 --lengths-sweep 4,8 --repeats 1"
else
  BIG=llama-1b HUGE=codellama-7b GEN="--batch 64 --prompt-len 128 --new-tokens 256 --repeats 3"
  # 2 repeats and no `ours_before`: on 2026-11-30 three methods × (warm-up + 3) did not fit 168 s
  PPO="--batch 64 --prompt-len 128 --new-tokens 256 --micro-batch 16 --repeats 2 --methods ours,reference_hf"
  SWEEP="--batches 8,32,128,256 --lengths-sweep 32,128,512 --repeats 1"
fi

BUDGET=${BUDGET:-540}  # seconds for the whole script: each step's limit is cut to what is left
step() {  # step NAME SECONDS CMD... : stdout → $OUT/NAME.json, stderr → the shared log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS - 15))
  [ $left -lt $limit ] && limit=$left
  [ $limit -gt 10 ] || { echo "=== $name skipped: no time left" | tee -a "$LOG"; return 1; }
  echo "=== $name ($(date +%T), limit ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.json" 2>> "$LOG"
  local rc=$?
  echo "=== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
  [ $rc = 0 ] || tail -n 25 "$LOG"
  case $name in pytest*|demo) cat "$OUT/$name.json" >> "$LOG"; tail -n 3 "$OUT/$name.json"; rm -f "$OUT/$name.json";; esac
  return $rc
}

{ date; nvidia-smi 2>&1 | head -15; $PY -c "import torch, transformers, megatron.core as m; \
print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__, \
'cuda', torch.cuda.is_available())"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step pytest_cuda 200 $PY -m pytest -q tests/test_cuda_paths.py tests/test_distributed_init.py -k "compat or cuda" \
  -p no:cacheprovider
# Every path once at a tiny shape: a failure here would fail every step below, so stop.
step smoke 240 $PY benchmarks/ppo_step.py --preset tiny-llama --batch 8 --prompt-len 16 --new-tokens 16 \
  --repeats 1 --lengths synthetic --prompt-lengths synthetic --methods ours,ours_before,reference_hf,ours_fed,ours_graph || exit 1
# The figures first (the 2026-11-30 run ran out of device time before the PPO step).
step gen_1b 150 $PY benchmarks/generation.py --preset $BIG $GEN --engines cache,graph,hf
step ppo_1b 240 $PY benchmarks/ppo_step.py --preset $BIG $PPO --lengths synthetic --prompt-lengths synthetic
step decode_overhead 90 $PY benchmarks/decode_overhead.py --repeats 3
step gen_7b 180 $PY benchmarks/generation.py --preset $HUGE ${GEN/--batch 64/--batch 32} --engines cache,hf
# The jobs themselves (SFT with greedy eval, PPO, eval) on the quickstart's task, cut short
# (ran end to end on 2026-11-30), the PPO rollouts through captured decode steps.
step demo 150 $PY -m megatron_reft demo --out "$OUT/demo_run" trainer.epochs=2 optim.planned_epochs=2 \
  'trainer.keep_epochs=[2]' data.synthetic_train_items=256 data.synthetic_eval_items=32 \
  --ppo trainer.max_steps=2 trainer.eval_interval=2 trainer.save_interval=2 ppo.rollout_batch_size=32 \
  model.cuda_graph_decode=true
cat "$OUT/demo_run/summary.json" >> "$LOG" 2>/dev/null; rm -rf "$OUT/demo_run"  # at most 8 files come back
step sweep_1b 600 $PY benchmarks/ppo_step.py --sweep --preset $BIG $SWEEP --micro-batch 16 \
  --lengths synthetic --prompt-lengths synthetic
$PY - "$OUT" <<'EOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    try:
        r = json.loads(f.read_text())
    except ValueError:
        print(f.name, "no JSON"); continue
    if "speedup_vs_reference_hf" in r:
        print(f.name, "ours/ref step x", round(r["speedup_vs_reference_hf"]["median"], 3),
              {k: v for k, v in r["speedup_vs_reference_hf"].items() if not k.endswith("_cpu")})
        for method in ("ours", "reference_hf"):
            if "mfu_of_spec" in r.get(method, {}):
                print(" ", method, "MFU of spec", r[method]["mfu_of_spec"], "share of matmul rate",
                      r[method]["share_of_matmul_rate"])
    if "cache" in r:
        print(f.name, "tok/s cache", round(r["cache"]["tokens_per_s"]), "hf", round(r.get("hf", {}).get("tokens_per_s", 0)),
              "decode", {k: r.get("decode", {}).get(k) for k in ("decode_step_ms", "fraction_of_spec_bandwidth")})
    if "graph" in r:
        print(f.name, "tok/s graph", round(r["graph"]["tokens_per_s"]), "greedy agreement", r.get("graph_greedy_agreement"),
              "decode", {k: r.get("decode_graph", {}).get(k) for k in ("decode_step_ms", "fraction_of_spec_bandwidth")})
    if "ms_per_step" in r:
        print(f.name, "ms per decode step", r["ms_per_step"], "hf/ours", r["hf_over_ours"])
    if "sweep" in r:
        for row in r["sweep"]:
            print(" ", row)
EOF
