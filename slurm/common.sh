# Shared body of the sbatch scripts (sft.sh, reft_ppo.sh, eval.sh, convert.sh, online_st.sh,
# offline_st_data.sh, train_rm.sh); sourced, not run.
#
# What a job does, top to bottom (reft_launch):
#   1. find the project and its Python (VENV, or a pyxis/enroot CONTAINER_IMAGE);
#   2. pick the run directory (kept across requeues: it is derived from SLURM_JOB_ID);
#   3. rendezvous from the allocation (MASTER_ADDR = first node, MASTER_PORT from the job id),
#      NCCL/torch defaults, all printed;
#   4. pre-flight: resolve + validate the config and print the parallel layout and memory plan
#      (a bad config ends the job here, before N ranks start);
#   5. srun one task per GPU (or per CPU slot), one log file per rank, --kill-on-bad-exit so a
#      dead rank ends the job instead of leaving the others stuck in a collective;
#   6. after srun: finished → exit 0; stopped for the time limit → requeue (the next start
#      resumes from checkpoints/latest); a rank died → say which, exit non-zero.
#
# Environment knobs (all optional): VENV, PYTHON, CONTAINER_IMAGE, CONTAINER_MOUNTS, RUN_DIR,
# RUNS_ROOT, REFT_HOME (found by the scripts), REFT_STOP_MARGIN, REFT_SRUN_WAIT, REFT_MAX_REQUEUES, MASTER_PORT,
# NCCL_* / TORCH_NCCL_* (ours are defaults only). See docs/slurm.md.

reft_log() { echo "[reft $(date '+%F %T')] $*"; }
reft_die() { echo "[reft $(date '+%F %T')] ERROR: $*" >&2; exit "${2:-1}"; }

# ---------------------------------------------------------------- arguments and paths
# CONFIG first, then key=value overrides; "--flag value" pairs are passed to the command as-is.
reft_parse_args() {
  REFT_CONFIG="" REFT_OVERRIDES=() REFT_FLAGS=()
  if [ "$REFT_NEEDS_CONFIG" = 1 ]; then
    [ $# -ge 1 ] || reft_die "usage: sbatch [sbatch options] $REFT_SCRIPT CONFIG [key=value ...]" 2
    REFT_CONFIG=$1
    shift
    [ -f "$REFT_CONFIG" ] || reft_die "config file not found: $REFT_CONFIG (relative to $PWD)" 2
    REFT_CONFIG=$(readlink -f "$REFT_CONFIG")
  fi
  while [ $# -gt 0 ]; do
    case "$1" in
      --*=*) REFT_FLAGS+=("$1") ;;
      --*) REFT_FLAGS+=("$1"); if [ $# -gt 1 ] && [[ "$2" != --* ]]; then REFT_FLAGS+=("$2"); shift; fi ;;
      *=*) REFT_OVERRIDES+=("$1") ;;
      *) reft_die "unexpected argument '$1' (expected key=value or --flag)" 2 ;;
    esac
    shift
  done
}

# The value of an override given on the command line (last one wins), or empty.
reft_override() {
  local key=$1 item value=""
  for item in "${REFT_OVERRIDES[@]}"; do
    [ "${item%%=*}" = "$key" ] && value=${item#*=}
  done
  echo "$value"
}

# Replace (or add) an override, so the command line shows each key once.
reft_set_override() {
  local key=$1 value=$2 item kept=()
  for item in "${REFT_OVERRIDES[@]}"; do
    [ "${item%%=*}" = "$key" ] || kept+=("$item")
  done
  REFT_OVERRIDES=("${kept[@]}" "$key=$value")
}

# A checkpoint argument may name a checkpoint, a checkpoints/ directory or a run directory:
# the latter two mean "its latest checkpoint".
reft_resolve_checkpoint() {
  local path=$1
  if [ -f "$path/checkpoints/latest" ]; then path="$path/checkpoints/$(head -n1 "$path/checkpoints/latest")"
  elif [ -f "$path/latest" ]; then path="$path/$(head -n1 "$path/latest")"
  fi
  echo "$path"
}

# ---------------------------------------------------------------- run directory
# trainer.output_dir=... on the command line, else RUN_DIR, else runs/<name>-<job id>.
# SLURM_JOB_ID survives a requeue, so a requeued job finds its own checkpoints.
reft_pick_run_dir() {
  local given
  given=$(reft_override trainer.output_dir)
  if [ -n "$given" ]; then
    RUN_DIR=$given
  elif [ -z "${RUN_DIR:-}" ]; then
    local name=${SLURM_JOB_NAME:-reft}
    if [ "$name" = "$REFT_SCRIPT" ] || [ "$name" = "$(basename "$REFT_SCRIPT")" ]; then
      name=$REFT_KIND
      if [ -n "$REFT_CONFIG" ]; then
        name=$(basename "${REFT_CONFIG%.*}")
        [[ "$name" == *[_-]"$REFT_KIND" ]] || name="$name-$REFT_KIND"  # no "..._sft-sft"
      fi
    fi
    RUN_DIR="${RUNS_ROOT:-runs}/$name-${SLURM_JOB_ID:-local}"
  fi
  mkdir -p "$RUN_DIR" || reft_die "cannot create run directory $RUN_DIR"
  RUN_DIR=$(readlink -f "$RUN_DIR")
  [ -z "$given" ] && [ "$REFT_NEEDS_CONFIG" = 1 ] && reft_set_override trainer.output_dir "$RUN_DIR"
  REFT_ATTEMPT=${SLURM_RESTART_COUNT:-0}
  REFT_LOG_DIR="$RUN_DIR/logs/job${SLURM_JOB_ID:-local}.$REFT_ATTEMPT"
  mkdir -p "$REFT_LOG_DIR"
  ln -sfn "$(basename "$REFT_LOG_DIR")" "$RUN_DIR/logs/latest"
  export REFT_LOG_DIR RUN_DIR
}

# ---------------------------------------------------------------- environment
reft_setup_python() {
  PYTHON=${PYTHON:-python}
  REFT_SRUN_CONTAINER=()
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    # pyxis: mount the checkout (and the submit directory) at the same paths so that every
    # path in configs and logs means the same inside and outside the container.
    local mounts="${CONTAINER_MOUNTS:-}"
    local defaults="$REFT_HOME:$REFT_HOME"
    [ "$SLURM_SUBMIT_DIR" != "$REFT_HOME" ] && defaults="$defaults,$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR"
    REFT_SRUN_CONTAINER=(--container-image="$CONTAINER_IMAGE" --container-mounts="${mounts:+$mounts,}$defaults"
                         --container-workdir="$SLURM_SUBMIT_DIR")
  elif [ -z "${VENV:-}" ] && [ -f "$REFT_HOME/.venv/bin/activate" ]; then
    VENV="$REFT_HOME/.venv"
  fi
  export VENV="${VENV:-}" PYTHON REFT_HOME
}

# Defaults only: anything already in the environment wins. Printed by reft_print_header.
reft_setup_env() {
  local tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_NTASKS:-1}}
  tasks_per_node=${tasks_per_node%%(*}
  local cpus=${SLURM_CPUS_ON_NODE:-1}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus / tasks_per_node > 0 ? cpus / tasks_per_node : 1 ))}
  export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
  # Rendezvous: every rank computes the same address and port without talking first. The
  # address always comes from this allocation (a MASTER_ADDR inherited from the submitting
  # shell would point elsewhere), and torchrun's variables must not hide the Slurm ones.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  addr=$(scontrol show node "$first" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n1 | cut -d= -f2)
  export MASTER_ADDR=${addr:-$first}
  # The attempt number is part of the port so a requeued job never meets a socket of its
  # previous run still in TIME_WAIT.
  export MASTER_PORT=${MASTER_PORT:-$(( 20000 + (SLURM_JOB_ID * 7 + REFT_ATTEMPT) % 20000 ))}
  # NCCL: abort communicators on error/timeout so a rank stuck behind a dead peer exits
  # (fail fast) instead of hanging; dump the collective trace of a timed-out rank to the logs.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}  # name used by torch < 2.2
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  export TORCH_NCCL_TRACE_BUFFER_SIZE=${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
  export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$REFT_LOG_DIR/nccl_trace_rank_}
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # One CUDA work queue keeps megatron's TP communication ordered with compute.
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
}

reft_gpus_per_node() {
  local g=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}
  g=${g##*:}  # "gpu:a100:8" → 8
  [[ "$g" =~ ^[0-9]+$ ]] || g=0
  echo "$g"
}

reft_print_header() {
  local gpus
  gpus=$(reft_gpus_per_node)
  reft_log "job ${SLURM_JOB_ID:-?} '${SLURM_JOB_NAME:-?}' attempt $REFT_ATTEMPT (requeues so far: ${SLURM_RESTART_COUNT:-0})"
  reft_log "command: $REFT_KIND  config: ${REFT_CONFIG:-none}"
  reft_log "overrides: ${REFT_OVERRIDES[*]:-none}  flags: ${REFT_FLAGS[*]:-none}"
  reft_log "nodes: ${SLURM_JOB_NUM_NODES:-1} (${SLURM_JOB_NODELIST:-?})  tasks: ${SLURM_NTASKS:-1} (${SLURM_TASKS_PER_NODE:-?} per node)"
  if [ "$gpus" -gt 0 ]; then
    reft_log "device: $gpus GPU(s) per node, NCCL backend"
    local tpn=${SLURM_NTASKS_PER_NODE:-$gpus}
    [ "$tpn" = "$gpus" ] || reft_log "WARNING: $tpn tasks per node but $gpus GPUs per node (expected one task per GPU)"
  else
    reft_log "device: CPU (no GPUs allocated), gloo backend"
  fi
  reft_log "rendezvous: MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
  reft_log "run dir: $RUN_DIR   logs: $REFT_LOG_DIR/rank_<N>.log"
  reft_log "python: ${CONTAINER_IMAGE:+container $CONTAINER_IMAGE, }${VENV:+venv $VENV, }$PYTHON"
  env | grep -E '^(NCCL_|TORCH_NCCL_|CUDA_DEVICE_MAX_CONNECTIONS|OMP_NUM_THREADS)' | sort | sed 's/^/[reft] env: /'
}

# ---------------------------------------------------------------- time limit
reft_seconds() {  # Slurm time (D-HH:MM:SS, HH:MM:SS, MM:SS) → seconds; empty when unlimited
  local t=$1 days=0 h=0 m=0 s=0
  [[ "$t" =~ ^[-0-9:]+$ ]] || return 0
  if [[ "$t" == *-* ]]; then days=${t%%-*}; t=${t#*-}; fi
  IFS=: read -r -a parts <<< "$t"
  case ${#parts[@]} in
    3) h=${parts[0]} m=${parts[1]} s=${parts[2]} ;;
    2) m=${parts[0]} s=${parts[1]} ;;
    1) s=${parts[0]} ;;
  esac
  echo $(( 10#$days * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

# Training stops itself (and checkpoints) REFT_STOP_MARGIN seconds before the time limit, so
# the requeued job resumes from a fresh checkpoint; the USR1 signal is the backstop.
reft_time_budget() {
  case "$REFT_KIND" in sft|ppo|online-st) ;; *) return 0 ;; esac  # the trainers that honour max_seconds
  [ -n "$(reft_override trainer.max_seconds)" ] && return 0
  local left
  left=$(reft_seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null | head -n1)")
  [ -n "$left" ] || return 0
  local budget=$(( left - ${REFT_STOP_MARGIN:-900} ))
  (( budget < 30 )) && budget=30
  reft_set_override trainer.max_seconds "$budget"
  reft_log "time left ${left}s: training stops and checkpoints after ${budget}s (REFT_STOP_MARGIN=${REFT_STOP_MARGIN:-900})"
}

# ---------------------------------------------------------------- signals
reft_on_usr1() {
  REFT_TIME_UP=1
  reft_log "SIGUSR1 (the time limit is near, or scancel --signal=USR1 --batch): requeueing;" \
           "the next start resumes from $(reft_latest_checkpoint)"
  reft_requeue
}

reft_on_term() {
  reft_log "SIGTERM (cancelled or preempted): stopping the ranks"
  [ -n "${REFT_SRUN_PID:-}" ] && kill -TERM "$REFT_SRUN_PID" 2>/dev/null
  REFT_TERMINATED=1
}

reft_requeue() {
  if (( ${SLURM_RESTART_COUNT:-0} >= ${REFT_MAX_REQUEUES:-50} )); then
    reft_die "not requeueing: already requeued ${SLURM_RESTART_COUNT} times (REFT_MAX_REQUEUES)" 3
  fi
  scontrol requeue "$SLURM_JOB_ID" || reft_die "scontrol requeue $SLURM_JOB_ID failed; resubmit with RUN_DIR=$RUN_DIR" 3
  # Slurm now stops this attempt; wait for it rather than racing it.
  sleep 120
}

reft_latest_checkpoint() {
  local pointer="$RUN_DIR/checkpoints/latest"
  if [ -f "$pointer" ]; then echo "checkpoints/$(head -n1 "$pointer")"; else echo "(no checkpoint yet)"; fi
}

# ---------------------------------------------------------------- running the ranks
# Runs one rank: cd, activate, run; on failure append "rank N ... ended: <why>" to
# rank_exits.log, so the job can say which rank went first.
REFT_TASK_SNIPPET='
cd "$SLURM_SUBMIT_DIR" || exit 1
if [ -n "$VENV" ]; then . "$VENV/bin/activate" || exit 1; fi
"$@"
rc=$?
if [ $rc -ne 0 ]; then
  if [ $rc -gt 128 ]; then why="killed by SIG$(kill -l $((rc - 128)) 2>/dev/null) (status $rc)"; else why="exit status $rc"; fi
  msg="$(date "+%F %T") rank ${SLURM_PROCID:-0} (node $(hostname), local rank ${SLURM_LOCALID:-0}) ended: $why"
  echo "[reft] $msg" >&2
  [ -n "$REFT_LOG_DIR" ] && echo "$msg" >> "$REFT_LOG_DIR/rank_exits.log"
fi
exit $rc
'

# One process, same environment as the ranks (inside the container when there is one).
reft_run_one() {
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    srun --ntasks=1 --nodes=1 "${REFT_SRUN_CONTAINER[@]}" bash -c "$REFT_TASK_SNIPPET" reft-task "$@"
  else
    bash -c "$REFT_TASK_SNIPPET" reft-task "$@"
  fi
}

reft_preflight() {
  [ -n "$REFT_PLAN_JOB" ] || return 0
  reft_log "pre-flight: config, layout and memory plan (megatron-reft plan)"
  reft_run_one "$PYTHON" -m megatron_reft.cli plan --job "$REFT_PLAN_JOB" --world-size "${SLURM_NTASKS:-1}" \
    --print-config --config "$REFT_CONFIG" "${REFT_OVERRIDES[@]}"
  local rc=$?
  [ $rc -eq 0 ] || reft_die "pre-flight failed (status $rc): fix the config above; no rank was started" "$rc"
}

reft_srun() {
  local wait_s=${REFT_SRUN_WAIT:-120}
  reft_log "starting ${SLURM_NTASKS:-1} rank(s): $*"
  reft_log "follow rank 0 with: tail -f $REFT_LOG_DIR/rank_0.log"
  REFT_STARTED=$(date +%s)
  # --kill-on-bad-exit: one rank failing stops all; --wait: a rank that exits while others
  # still run (they would block in a collective) stops the rest after wait_s seconds.
  srun --kill-on-bad-exit=1 --wait="$wait_s" --output="$REFT_LOG_DIR/rank_%t.log" \
       "${REFT_SRUN_CONTAINER[@]}" bash -c "$REFT_TASK_SNIPPET" reft-task "$@" \
       > "$REFT_LOG_DIR/srun.log" 2>&1 &
  REFT_SRUN_PID=$!
  # Waiting in the background lets the USR1/TERM traps run while the ranks work.
  local rc
  while true; do
    wait "$REFT_SRUN_PID"
    rc=$?
    kill -0 "$REFT_SRUN_PID" 2>/dev/null || break
  done
  REFT_SRUN_PID=""
  REFT_SRUN_RC=$rc
}

reft_report_failure() {
  local elapsed=$(( $(date +%s) - REFT_STARTED ))
  echo "======================================================================" >&2
  reft_log "FAILED: the ranks ended with status $REFT_SRUN_RC after ${elapsed}s" >&2
  if [ -s "$REFT_LOG_DIR/rank_exits.log" ]; then
    reft_log "first rank to fail: $(head -n1 "$REFT_LOG_DIR/rank_exits.log")" >&2
  fi
  local srun_lines
  srun_lines=$(grep -E 'task [0-9]+|error' "$REFT_LOG_DIR/srun.log" 2>/dev/null | head -n 8)
  [ -n "$srun_lines" ] && echo "$srun_lines" | sed 's/^/[reft] /' >&2
  local rank
  rank=$(head -n1 "$REFT_LOG_DIR/rank_exits.log" 2>/dev/null | grep -o 'rank [0-9]*' | head -n1 | cut -d' ' -f2)
  [ -z "$rank" ] && rank=$(echo "$srun_lines" | grep -o 'task [0-9]*' | head -n1 | cut -d' ' -f2)
  if [ -n "$rank" ] && [ -f "$REFT_LOG_DIR/rank_$rank.log" ]; then
    reft_log "last lines of $REFT_LOG_DIR/rank_$rank.log:" >&2
    tail -n 15 "$REFT_LOG_DIR/rank_$rank.log" | sed 's/^/    /' >&2
  fi
  reft_log "the other ranks were stopped (srun --kill-on-bad-exit). Latest checkpoint: $(reft_latest_checkpoint)" >&2
  [ "$REFT_NEEDS_CONFIG" = 1 ] && reft_log "to resume: RUN_DIR=$RUN_DIR sbatch [same options] $REFT_SCRIPT ${REFT_USER_ARGS[*]}" >&2
  echo "======================================================================" >&2
}

# Jobs that train to a planned end (metrics.jsonl + config.yaml); eval and sampling jobs finish
# when their command does (a requeued sampling job resumes from its sample store).
reft_is_training_kind() {
  case "$REFT_KIND" in sft|ppo|online-st|rm) return 0 ;; *) return 1 ;; esac
}

# A run directory given as model.load → its latest checkpoint (reft_resolve_checkpoint).
reft_resolve_load_override() {
  local given resolved
  given=$(reft_override model.load)
  [ -n "$given" ] && [ "$given" != null ] || return 0
  resolved=$(reft_resolve_checkpoint "$given")
  if [ "$resolved" != "$given" ]; then
    reft_set_override model.load "$resolved"
    reft_log "model.load: $given -> $resolved"
  fi
}

# Did the trainer reach its planned end (trainer.max_steps, else trainer.epochs)? Read from the
# resolved config it wrote and the last line of metrics.jsonl; plain awk, no Python needed.
reft_run_complete() {
  local cfg="$RUN_DIR/config.yaml" metrics="$RUN_DIR/metrics.jsonl"
  [ -f "$cfg" ] && [ -f "$metrics" ] || return 1
  local max_steps epochs last_step last_epoch
  max_steps=$(awk '/^trainer:/{t=1;next} /^[^ ]/{t=0} t && $1=="max_steps:"{print $2; exit}' "$cfg")
  epochs=$(awk '/^trainer:/{t=1;next} /^[^ ]/{t=0} t && $1=="epochs:"{print $2; exit}' "$cfg")
  last_step=$(grep -o '"step": [0-9]*' "$metrics" | tail -n1 | awk '{print $2}')
  last_epoch=$(grep -o '"epoch": [0-9.e+-]*' "$metrics" | tail -n1 | awk '{print $2}')
  [ -n "$last_step" ] || return 1
  if [ -n "$max_steps" ] && [ "$max_steps" != "null" ]; then
    (( last_step >= max_steps ))
  else
    awk -v e="$last_epoch" -v n="$epochs" 'BEGIN { exit !(e + 1e-9 >= n) }'
  fi
}

reft_finish() {
  if [ -n "${REFT_TERMINATED:-}" ]; then
    reft_log "stopped by SIGTERM; Slurm requeues a preempted job itself (resume: $(reft_latest_checkpoint))"
    exit 143
  fi
  if [ "$REFT_SRUN_RC" -ne 0 ]; then
    reft_report_failure
    exit "$REFT_SRUN_RC"
  fi
  if [ "$REFT_NEEDS_CONFIG" = 1 ] && reft_is_training_kind && ! reft_run_complete; then
    local before=$REFT_CKPT_AT_START after
    after=$(reft_latest_checkpoint)
    if [ "$after" = "$before" ]; then
      reft_die "the trainer stopped early without a new checkpoint ($after); not requeueing" 4
    fi
    reft_log "stopped before the planned end to respect the time limit; latest $after; requeueing"
    reft_requeue
  fi
  reft_log "done: $RUN_DIR"
  exit 0
}

# ---------------------------------------------------------------- entry point
# Callers set REFT_KIND (sft|ppo|online-st|rm|offline-st-data|eval|convert), REFT_SCRIPT, REFT_NEEDS_CONFIG (1|0),
# REFT_PLAN_JOB (job name for the memory plan, or empty) and REFT_COMMAND (array: the command
# after "python -m megatron_reft.cli"); REFT_PREPARE (a function name) may edit arguments.
reft_launch() {
  set -uo pipefail
  [ -n "${SLURM_JOB_ID:-}" ] || reft_die "submit with sbatch (this script needs a Slurm allocation)" 2
  cd "${SLURM_SUBMIT_DIR:=$PWD}" || reft_die "cannot enter $SLURM_SUBMIT_DIR"
  REFT_USER_ARGS=("$@")
  reft_parse_args "$@"
  reft_pick_run_dir
  exec > >(tee -a "$REFT_LOG_DIR/launcher.log") 2>&1
  reft_setup_python
  reft_setup_env
  trap reft_on_usr1 USR1
  trap reft_on_term TERM
  reft_print_header
  [ -n "${REFT_PREPARE:-}" ] && "$REFT_PREPARE"
  reft_time_budget
  REFT_CKPT_AT_START=$(reft_latest_checkpoint)
  [ "$REFT_NEEDS_CONFIG" = 1 ] && reft_log "resume: $REFT_CKPT_AT_START (trainer.resume=auto picks it up)"
  reft_preflight
  local cmd=("$PYTHON" -m megatron_reft.cli "${REFT_COMMAND[@]}")
  [ -n "$REFT_CONFIG" ] && cmd+=(--config "$REFT_CONFIG")
  reft_srun "${cmd[@]}" "${REFT_FLAGS[@]}" "${REFT_OVERRIDES[@]}"
  reft_finish
}
