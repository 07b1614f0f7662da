#!/bin/bash
# Online self-training (reft.md §6), the baseline of ReFT, on Slurm, from a warm-up checkpoint.
#   sbatch [sbatch options] slurm/online_st.sh CONFIG model.load=WARMUP [key=value ...]
# model.load may name a checkpoint, a checkpoints/ directory or an SFT run directory (its latest
# checkpoint). Recipes: configs/*_online-st.yaml. Same defaults and overrides as slurm/reft_ppo.sh
# (docs/slurm.md); stops and requeues before the time limit like it.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REFT_KIND=online-st REFT_SCRIPT=slurm/online_st.sh REFT_NEEDS_CONFIG=1 REFT_PLAN_JOB=ppo  # plan: PPO's, an upper bound
REFT_COMMAND=(online-st)
REFT_PREPARE=reft_resolve_load_override
# sbatch runs a copy of this file from Slurm's spool directory: find the checkout (REFT_HOME,
# else the submit directory, else the path the script was submitted as).
_submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2)
for _dir in "${REFT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${_submitted:+$(dirname "$_submitted")/..}"; do
  if [ -n "$_dir" ] && [ -f "$_dir/slurm/common.sh" ]; then REFT_HOME=$(cd "$_dir" && pwd); break; fi
done
[ -f "${REFT_HOME:-}/slurm/common.sh" ] || { echo "cannot find megatron-reft: submit from its root or set REFT_HOME" >&2; exit 2; }
. "$REFT_HOME/slurm/common.sh"
reft_launch "$@"
