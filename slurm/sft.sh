#!/bin/bash
# Warm-up SFT (reft.md §1) on Slurm.
#   sbatch [sbatch options] slurm/sft.sh CONFIG [key=value ...]
# Defaults: one exclusive 8-GPU node, one task per GPU. Command-line sbatch options and SBATCH_*
# environment variables override these lines, e.g. -N 2, -p PART, -A ACCT, -t 12:00:00, or
# --ntasks-per-node=2 --gpus-per-node=0 for a CPU (gloo) run. See docs/slurm.md.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REFT_KIND=sft REFT_SCRIPT=slurm/sft.sh REFT_NEEDS_CONFIG=1 REFT_PLAN_JOB=sft
REFT_COMMAND=(sft)
# sbatch runs a copy of this file from Slurm's spool directory: find the checkout (REFT_HOME,
# else the submit directory, else the path the script was submitted as).
_submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2)
for _dir in "${REFT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${_submitted:+$(dirname "$_submitted")/..}"; do
  if [ -n "$_dir" ] && [ -f "$_dir/slurm/common.sh" ]; then REFT_HOME=$(cd "$_dir" && pwd); break; fi
done
[ -f "${REFT_HOME:-}/slurm/common.sh" ] || { echo "cannot find megatron-reft: submit from its root or set REFT_HOME" >&2; exit 2; }
. "$REFT_HOME/slurm/common.sh"
reft_launch "$@"
