#!/bin/bash
# Hugging Face <-> Megatron checkpoint conversion on Slurm (docs/conversion.md).
#   sbatch [sbatch options] slurm/convert.sh hf-to-megatron --hf-dir DIR --out DIR [--tp N] [--pp M]
#   sbatch [sbatch options] slurm/convert.sh megatron-to-hf --ckpt DIR --out DIR
#   sbatch --ntasks-per-node=2 --gpus-per-node=2 slurm/convert.sh verify --hf-dir DIR --ckpt DIR --tp 2
# Conversion streams tensors on the CPU: one task, no GPU, by default. Not requeued (a
# partial --out is not resumable; rerun with --overwrite). See docs/slurm.md.
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=0
#SBATCH --exclusive
#SBATCH --time=04:00:00
#SBATCH --no-requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REFT_KIND=convert REFT_SCRIPT=slurm/convert.sh REFT_NEEDS_CONFIG=0 REFT_PLAN_JOB=

reft_convert_prepare() {
  [ ${#REFT_FLAGS[@]} -gt 0 ] || reft_die "usage: sbatch slurm/convert.sh {hf-to-megatron|megatron-to-hf|verify} --flag value ..." 2
  return 0
}
REFT_PREPARE=reft_convert_prepare
# sbatch runs a copy of this file from Slurm's spool directory: find the checkout (REFT_HOME,
# else the submit directory, else the path the script was submitted as).
_submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2)
for _dir in "${REFT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${_submitted:+$(dirname "$_submitted")/..}"; do
  if [ -n "$_dir" ] && [ -f "$_dir/slurm/common.sh" ]; then REFT_HOME=$(cd "$_dir" && pwd); break; fi
done
[ -f "${REFT_HOME:-}/slurm/common.sh" ] || { echo "cannot find megatron-reft: submit from its root or set REFT_HOME" >&2; exit 2; }
. "$REFT_HOME/slurm/common.sh"
# The sub-command is the first argument; the rest are its flags.
[ $# -ge 1 ] || reft_die "usage: sbatch slurm/convert.sh {hf-to-megatron|megatron-to-hf|verify} --flag value ..." 2
REFT_COMMAND=(convert "$1")
shift
reft_launch "$@"
