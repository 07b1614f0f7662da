#!/bin/bash
# Greedy accuracy of a checkpoint on data.eval_file (reft.md §5) on Slurm.
#   sbatch [sbatch options] slurm/eval.sh CONFIG --ckpt CKPT [--out FILE] [key=value ...]
#   CKPT=runs/gsm8k_ncot_ppo-1234 sbatch slurm/eval.sh CONFIG
# CKPT may be a checkpoint, a checkpoints/ directory or a run directory (its latest checkpoint).
# Predictions go to <run dir>/predictions.jsonl unless --out is given. See docs/slurm.md.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REFT_KIND=eval REFT_SCRIPT=slurm/eval.sh REFT_NEEDS_CONFIG=1 REFT_PLAN_JOB=eval
REFT_COMMAND=(eval)

reft_eval_prepare() {  # --ckpt (or CKPT) → a concrete checkpoint, also shown to the pre-flight plan
  local i ckpt=${CKPT:-} flags=()
  for (( i = 0; i < ${#REFT_FLAGS[@]}; i++ )); do
    if [ "${REFT_FLAGS[$i]}" = --ckpt ]; then ckpt=${REFT_FLAGS[$((i + 1))]:-}; i=$((i + 1))
    elif [[ "${REFT_FLAGS[$i]}" == --ckpt=* ]]; then ckpt=${REFT_FLAGS[$i]#--ckpt=}
    else flags+=("${REFT_FLAGS[$i]}"); fi
  done
  [ -n "$ckpt" ] || reft_die "eval needs a checkpoint: --ckpt DIR or CKPT=DIR" 2
  ckpt=$(reft_resolve_checkpoint "$ckpt")
  REFT_FLAGS=("${flags[@]}" --ckpt "$ckpt")
  reft_set_override model.load "$ckpt"
  reft_log "checkpoint: $ckpt"
}
REFT_PREPARE=reft_eval_prepare
# sbatch runs a copy of this file from Slurm's spool directory: find the checkout (REFT_HOME,
# else the submit directory, else the path the script was submitted as).
_submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2)
for _dir in "${REFT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${_submitted:+$(dirname "$_submitted")/..}"; do
  if [ -n "$_dir" ] && [ -f "$_dir/slurm/common.sh" ]; then REFT_HOME=$(cd "$_dir" && pwd); break; fi
done
[ -f "${REFT_HOME:-}/slurm/common.sh" ] || { echo "cannot find megatron-reft: submit from its root or set REFT_HOME" >&2; exit 2; }
. "$REFT_HOME/slurm/common.sh"
reft_launch "$@"
