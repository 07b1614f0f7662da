#!/bin/bash
# Offline self-training data (reft.md §6) on Slurm: k samples per train question at T = 1 from the
# warm-up checkpoint, data-parallel; keeps up to 10 unique correct ones + the gold CoT.
#   sbatch [sbatch options] slurm/offline_st_data.sh CONFIG --ckpt CKPT [--samples 100] [--out FILE] [key=value ...]
#   CKPT=runs/codellama-7b_gsm8k_pcot_sft-1234 sbatch slurm/offline_st_data.sh configs/codellama-7b_gsm8k_pcot_ppo.yaml
# CONFIG: the run's PPO recipe (train file, prompt/response lengths, T = 1). CKPT may be a run
# directory (its latest checkpoint). --out defaults to <run dir>/train.jsonl; its samples go to
# <out>.samples/, which a requeued or resubmitted job (same RUN_DIR) resumes.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REFT_KIND=offline-st-data REFT_SCRIPT=slurm/offline_st_data.sh REFT_NEEDS_CONFIG=1 REFT_PLAN_JOB=eval
REFT_COMMAND=(offline-st-data)

reft_offline_st_prepare() {  # --ckpt (or CKPT) → a concrete checkpoint; --out under the run directory
  local i ckpt=${CKPT:-} out="" flags=()
  for (( i = 0; i < ${#REFT_FLAGS[@]}; i++ )); do
    case "${REFT_FLAGS[$i]}" in
      --ckpt) ckpt=${REFT_FLAGS[$((i + 1))]:-}; i=$((i + 1)) ;;
      --ckpt=*) ckpt=${REFT_FLAGS[$i]#--ckpt=} ;;
      --out|--out=*) out=set; flags+=("${REFT_FLAGS[$i]}") ;;
      *) flags+=("${REFT_FLAGS[$i]}") ;;
    esac
  done
  [ -n "$ckpt" ] || reft_die "offline-st-data needs the warm-up checkpoint: --ckpt DIR or CKPT=DIR" 2
  ckpt=$(reft_resolve_checkpoint "$ckpt")
  REFT_FLAGS=("${flags[@]}" --ckpt "$ckpt")
  [ -n "$out" ] || REFT_FLAGS+=(--out "$RUN_DIR/train.jsonl")
  reft_set_override model.load "$ckpt"
  reft_log "warm-up checkpoint: $ckpt"
}
REFT_PREPARE=reft_offline_st_prepare
# sbatch runs a copy of this file from Slurm's spool directory: find the checkout (REFT_HOME,
# else the submit directory, else the path the script was submitted as).
_submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2)
for _dir in "${REFT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${_submitted:+$(dirname "$_submitted")/..}"; do
  if [ -n "$_dir" ] && [ -f "$_dir/slurm/common.sh" ]; then REFT_HOME=$(cd "$_dir" && pwd); break; fi
done
[ -f "${REFT_HOME:-}/slurm/common.sh" ] || { echo "cannot find megatron-reft: submit from its root or set REFT_HOME" >&2; exit 2; }
. "$REFT_HOME/slurm/common.sh"
reft_launch "$@"
