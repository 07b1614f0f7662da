#!/bin/bash
# The reranking reward model (reft.md §6) on Slurm: a correct/incorrect classifier from the SFT
# (or ReFT) checkpoint, trained on offline-st-data's samples of the train set.
#   sbatch [sbatch options] slurm/train_rm.sh CONFIG --samples-dir STORE [model.load=CKPT] [key=value ...]
# Recipes: configs/*_rm.yaml. model.load may be a run directory (its latest checkpoint). A job
# that hits its time limit is requeued (USR1) and resumes from the last epoch's checkpoint.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REFT_KIND=rm REFT_SCRIPT=slurm/train_rm.sh REFT_NEEDS_CONFIG=1 REFT_PLAN_JOB=sft
REFT_COMMAND=(train-rm)
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
