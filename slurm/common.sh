# shellcheck shell=bash
# Sourced by single-node.sbatch and multi-node.sbatch: one `accelerate launch` per node.
#
# Dry run (no Slurm needed): LLMTRAIN_DRY_RUN=1 with fake SLURM_* variables prints the exact
# command every node would run and exits, e.g.
#   LLMTRAIN_DRY_RUN=1 SLURM_JOB_ID=42 SLURM_NNODES=2 SLURM_JOB_NODELIST=gpu01,gpu02 \
#     SLURM_GPUS_ON_NODE=8 bash slurm/multi-node.sbatch model=gpt2-medium dist=zero3
# (in a dry run without scontrol, SLURM_JOB_NODELIST is a comma-separated host list).
set -euo pipefail

: "${SLURM_JOB_ID:?run under sbatch, or set fake SLURM_* variables with LLMTRAIN_DRY_RUN=1}"
DRY_RUN="${LLMTRAIN_DRY_RUN:-0}"
NNODES="${SLURM_NNODES:-1}"
if [[ -z "${LLMTRAIN_GPUS_PER_NODE:-}${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "llmtrain: SLURM_GPUS_ON_NODE is not set (no --gpus-per-node or --gres=gpu:N?);" \
        "starting 8 processes per node (LLMTRAIN_GPUS_PER_NODE sets it)" >&2
fi
GPUS_PER_NODE="${LLMTRAIN_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # "h100:8" -> 8
MAX_REQUEUES="${LLMTRAIN_MAX_REQUEUES:-5}"
# 20000-31999: below Linux's ephemeral ports (32768-60999), which outgoing connections take.
PORT="${LLMTRAIN_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 12000))}"
# The same run dir on every requeue of this job, so trainer.resume=auto finds its checkpoints.
# The job name lands in a Hydra override: the characters Hydra parses (= , : ' ...) become _.
JOB_NAME="${SLURM_JOB_NAME:-llmtrain}"
RUN_DIR="${LLMTRAIN_RUN_DIR:-runs/${JOB_NAME//[^A-Za-z0-9._-]/_}-${SLURM_JOB_ID}}"

if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then  # a dry run that names no hosts
    HOSTS=(localhost)
elif command -v scontrol >/dev/null 2>&1; then
    mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
elif [[ "${SLURM_JOB_NODELIST:-}" == *"["* ]]; then
    echo "llmtrain: SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST} needs scontrol to expand it, and" \
        "scontrol is not on PATH (in a dry run, list the hosts: gpu01,gpu02)" >&2
    exit 2
else
    IFS=',' read -r -a HOSTS <<< "${SLURM_JOB_NODELIST}"
fi
MAIN_ADDR="${HOSTS[0]}"

# Collective hangs fail with a message instead of burning the allocation; logs stay readable.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_DUMP_ON_TIMEOUT=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_DEBUG_SUBSYS="${NCCL_DEBUG_SUBSYS:-INIT,NET}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONUNBUFFERED=1
# A SIGTERM (scancel, a preemption without a user signal) reaches torchrun's agent, which gives
# the workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (torch's default: 30) to finish their step
# and save before it kills them; a longer save was lost. Slurm's own KillWait or GraceTime is
# then the limit. (A rank that crashed leaves the others up to this long in a collective.)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-180}"

# TRAIN_ARGS: the user's training arguments and what a requeued job needs. The user's
# own hydra.run.dir, dist.timeout_s and trainer.resume win over the script's: a run dir given
# on the command line is the one requeues continue (and sets RUN_DIR); a
# trainer.resume=<checkpoint> (a second phase, the run of an earlier job) is used until the
# run dir holds a checkpoint of its own, then trainer.resume=auto continues from that. One of
# the run dir's own checkpoints (a rollback) is used on the job's first start only.
train_overrides() {
    local a value resume=auto
    plain_path "${RUN_DIR}" LLMTRAIN_RUN_DIR
    TRAIN_ARGS=(${LLMTRAIN_TIMEOUT_S:+"dist.timeout_s=${LLMTRAIN_TIMEOUT_S}"})
    for a in "$@"; do
        case "${a}" in
            hydra.run.dir=* | +hydra.run.dir=* | ++hydra.run.dir=*)
                value="${a#*=}"
                [[ "${value}" =~ ^\'(.*)\'$ || "${value}" =~ ^\"(.*)\"$ ]] && value="${BASH_REMATCH[1]}"
                plain_path "${value}" hydra.run.dir
                RUN_DIR="${value}"
                ;;
            trainer.resume=* | +trainer.resume=* | ++trainer.resume=*) resume="${a#*=}" ;;
            *) TRAIN_ARGS+=("${a}") ;;
        esac
    done
    if compgen -G "${RUN_DIR}/checkpoints/step_*/trainer_state.json" >/dev/null; then
        # One of this run dir's own checkpoints, named, is a rollback: the job's first start
        # goes back to it (and points `latest` at it); a requeue continues with auto.
        case "$(realpath -m -- "${resume}")/" in
            "$(realpath -m -- "${RUN_DIR}")/checkpoints/"*)
                [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]] && resume=auto ;;
            *) resume=auto ;;
        esac
    fi
    TRAIN_ARGS+=("trainer.resume=${resume}" "hydra.run.dir=$(hydra_value "${RUN_DIR}")")
}

# $1 as one Hydra value: quoted when Hydra would parse it (= , [ ' ~ or a space in a path).
hydra_value() {
    if [[ "$1" =~ ^[A-Za-z0-9._/+@%:-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\\\'}"
    fi
}

# The run dir is read here too (its checkpoints, the exit file), so it must mean to this script
# what it means to Hydra: a path, with no ${...} interpolation or backslash escape in it.
plain_path() {
    if [[ -z "$1" || "$1" == *'$'* || "$1" == *'\'* ]]; then
        echo "llmtrain: $2=$1: give the run dir as a plain path, without \$ or \\" \
            "(the script finds the run's checkpoints there)" >&2
        exit 2
    fi
}

# The command of node $1 (its SLURM_NODEID); the training arguments (TRAIN_ARGS) follow.
node_command() {
    local node="$1"; shift
    printf '%q ' accelerate launch \
        --config_file "${LAUNCH_CONFIG}" \
        --num_machines "${NNODES}" \
        --num_processes "$((NNODES * GPUS_PER_NODE))" \
        --machine_rank "${node}" \
        --main_process_ip "${MAIN_ADDR}" \
        --main_process_port "${PORT}" \
        -m llmtrain.train "$@"
    echo
}

run_nodes() {
    train_overrides "$@"
    set -- "${TRAIN_ARGS[@]}"
    if [[ "${DRY_RUN}" == "1" ]]; then
        for ((node = 0; node < NNODES; node++)); do
            echo "node ${node} (${HOSTS[$node]:-?}): $(node_command "${node}" "$@")"
        done
        return 0
    fi
    echo "llmtrain: job ${SLURM_JOB_ID}, ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), main ${MAIN_ADDR}:${PORT}, run dir ${RUN_DIR}, restart ${SLURM_RESTART_COUNT:-0}"
    job_end_time
    local args
    args="$(printf '%q ' "$@")"
    local rc=0
    # The training processes write their exit code here: the launcher's own code is 1 for
    # any failure of its workers, 75 (preempted) and 2 (config error) included.
    export LLMTRAIN_EXIT_FILE="${RUN_DIR}/.exit-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
    mkdir -p "${RUN_DIR}"
    rm -f "${LLMTRAIN_EXIT_FILE}"
    local latest="${RUN_DIR}/checkpoints/latest" before
    before="$(cat "${latest}" 2>/dev/null || true)"
    # One launcher per node; each computes its machine rank from its own SLURM_NODEID.
    # Slurm sends USR1 (--signal=USR1@90) to every process of the step. The launcher and
    # torchrun's agent inherit it as ignored (they would die of it); the training processes
    # install their own handler, save a checkpoint and exit non-zero, which requeues the job.
    # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without it each
    # node's launcher, its data workers and its GPU ranks would share one core.
    # The step runs in a subshell that records srun's status in a file: a signal trapped below
    # can cut this shell's wait short, and bash 5.2 then loses a child's status (wait gives -1).
    local status_file="${RUN_DIR}/.srun-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
    rm -f "${status_file}"
    (
        srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
            ${SLURM_CPUS_PER_TASK:+--cpus-per-task="${SLURM_CPUS_PER_TASK}"} bash -c "
            set -euo pipefail
            source '${SLURM_SCRIPT_DIR}/common.sh'
            trap '' USR1
            cmd=\"\$(node_command \"\${SLURM_NODEID}\" ${args})\"
            eval \"exec \${cmd}\"
        " && status=0 || status=$?
        echo "${status}" > "${status_file}"
    ) &
    # --signal=B:USR1@90 (or scancel --batch -s USR1) signals this shell, not the step: pass it
    # to srun (which forwards it to every task) rather than die of it with the job unsaved.
    local step=$!
    trap 'echo "llmtrain: USR1 reached the batch script; passing it to the training step"
          pkill -USR1 -P "${step}" || true' USR1
    while kill -0 "${step}" 2>/dev/null; do
        wait "${step}" || true
    done
    trap '' USR1  # a late one must not cut the requeue short
    rc="$(cat "${status_file}" 2>/dev/null || echo 1)"  # none: the subshell itself was killed
    rm -f "${status_file}"
    if [[ ${rc} -ne 0 && -s "${LLMTRAIN_EXIT_FILE}" ]]; then
        rc="$(head -n 1 "${LLMTRAIN_EXIT_FILE}")"
    fi
    # 75: preempted (USR1/TERM) or out of time with a new checkpoint: always requeued, a
    # week-long run under a 24-hour limit needs six of these. Other failures (a crashed node,
    # a NCCL timeout, a stop whose save failed) resume from the last checkpoint too, up to
    # MAX_REQUEUES times in a row without a new checkpoint. 2 is a config, data or checkpoint
    # error, or a run that diverged, and 126/127 a launcher that could not start: a requeue
    # would only fail again.
    local failures_file="${RUN_DIR}/.failures-${SLURM_JOB_ID}" failures=0 saved=0
    [[ -s "${failures_file}" ]] && failures="$(head -n 1 "${failures_file}")"
    if [[ "$(cat "${latest}" 2>/dev/null || true)" != "${before}" ]]; then
        saved=1
        failures=0
        rm -f "${failures_file}"
    fi
    if [[ ${rc} -eq 0 ]]; then
        :
    elif [[ ${rc} -eq 2 ]]; then
        echo "llmtrain: config, data or checkpoint error, or divergence (exit 2); not requeueing, fix the arguments"
    elif [[ ${rc} -eq 126 || ${rc} -eq 127 ]]; then
        echo "llmtrain: the launch command could not start (exit ${rc}: is accelerate on PATH" \
            "in the job's environment?); not requeueing"
    elif [[ ${rc} -eq 75 && ${saved} -eq 1 ]]; then
        echo "llmtrain: stopped by a signal or the time limit with a checkpoint (exit 75); requeueing job ${SLURM_JOB_ID} (resume=auto)"
        requeue
    elif [[ ${failures} -lt ${MAX_REQUEUES} ]]; then
        echo "$((failures + 1))" > "${failures_file}"
        local what="training exited with ${rc}"
        [[ ${rc} -eq 75 ]] && what="stopped by a signal or the time limit without a new checkpoint (exit 75)"
        echo "llmtrain: ${what}; requeueing job ${SLURM_JOB_ID} (resume=auto), failure $((failures + 1)) of ${MAX_REQUEUES}"
        requeue
    else
        echo "llmtrain: training exited with ${rc}; not requeueing, job ${SLURM_JOB_ID} failed ${MAX_REQUEUES} times in a row without a new checkpoint (LLMTRAIN_MAX_REQUEUES)"
    fi
    return "${rc}"
}

# The job's end as SLURM_JOB_END_TIME (epoch seconds), a deadline the training processes keep by
# themselves (llmtrain.timelimit). Slurm 22.05 and older do not set it: then the job's EndTime is
# asked of squeue here, once per start of the job rather than by every rank. Unset if unknown
# (no time limit).
job_end_time() {
    [[ -n "${SLURM_JOB_END_TIME:-}" ]] && return 0
    local end
    end="$(squeue -h -j "${SLURM_JOB_ID}" -o %e 2>/dev/null || true)"  # 2026-11-25T06:07:20
    [[ "${end}" =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}$ ]] || return 0
    end="$(date -d "${end}" +%s 2>/dev/null)" || return 0
    export SLURM_JOB_END_TIME="${end}"
}

# scontrol requeue, tried again while the controller does not answer (a busy slurmctld times
# out now and then): a job that saved its checkpoint must not end for want of a requeue.
requeue() {
    local wait
    for wait in 5 15 30 0; do
        scontrol requeue "${SLURM_JOB_ID}" && return 0
        if [[ ${wait} -gt 0 ]]; then
            echo "llmtrain: scontrol requeue ${SLURM_JOB_ID} failed; trying again in ${wait} s" >&2
            sleep "${wait}"
        fi
    done
    echo "llmtrain: could not requeue job ${SLURM_JOB_ID}; submit the same command again with" \
        "hydra.run.dir=$(hydra_value "${RUN_DIR}"): it resumes from the run's last checkpoint" >&2
}
