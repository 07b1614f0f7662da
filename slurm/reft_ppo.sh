#!/bin/bash
# ReFT PPO (reft.md §4) on Slurm, from a warm-up checkpoint.
#   sbatch [sbatch options] slurm/reft_ppo.sh CONFIG [key=value ...]
# model.load may name a checkpoint, a checkpoints/ directory or an SFT run directory (then its
# latest checkpoint is used), e.g. model.load=runs/gsm8k_ncot_sft-1234.
# Defaults: one exclusive 8-GPU node, one task per GPU; override with sbatch options
# (e.g. -N 4, -p PART, -A ACCT, --ntasks-per-node=2 --gpus-per-node=0 for CPU). See docs/slurm.md.
# A separate critic on GPUs of its own (critic.mode=separate, critic.world_size=C; e.g.
# configs/*_ppo_separate-critic.yaml) runs from the same allocation: srun starts one task per
# GPU as usual and the world splits by rank (SLURM_PROCID): ranks 0..N-C-1 are the actor (policy +
# reference, rank 0 logs and writes checkpoints), ranks N-C..N-1 the critic, each role with its
# own TP x PP x DP. With whole nodes per role (C a multiple of the GPUs per node) no node mixes
# roles. The pre-flight plan validates the split against the allocation and prints both roles'
# memory; a dead or hung rank of either role ends the job like any other (docs/slurm.md).
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

REFT_KIND=ppo REFT_SCRIPT=slurm/reft_ppo.sh REFT_NEEDS_CONFIG=1 REFT_PLAN_JOB=ppo
REFT_COMMAND=(ppo)

REFT_PREPARE=reft_resolve_load_override  # a run directory as model.load → its latest checkpoint
# sbatch runs a copy of this file from Slurm's spool directory: find the checkout (REFT_HOME,
# else the submit directory, else the path the script was submitted as).
_submitted=$(scontrol show job "${SLURM_JOB_ID:-0}" 2>/dev/null | grep -o 'Command=[^ ]*' | head -n1 | cut -d= -f2)
for _dir in "${REFT_HOME:-}" "${SLURM_SUBMIT_DIR:-$PWD}" "${_submitted:+$(dirname "$_submitted")/..}"; do
  if [ -n "$_dir" ] && [ -f "$_dir/slurm/common.sh" ]; then REFT_HOME=$(cd "$_dir" && pwd); break; fi
done
[ -f "${REFT_HOME:-}/slurm/common.sh" ] || { echo "cannot find megatron-reft: submit from its root or set REFT_HOME" >&2; exit 2; }
. "$REFT_HOME/slurm/common.sh"
reft_launch "$@"
