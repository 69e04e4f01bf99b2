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
GPUS_PER_NODE="${LLMTRAIN_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # "h100:8" -> 8
MAX_REQUEUES="${LLMTRAIN_MAX_REQUEUES:-5}"
PORT="${LLMTRAIN_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
# The same run dir on every requeue of this job, so trainer.resume=auto finds its checkpoints.
RUN_DIR="${LLMTRAIN_RUN_DIR:-runs/${SLURM_JOB_NAME:-llmtrain}-${SLURM_JOB_ID}}"

if command -v scontrol >/dev/null 2>&1; then
    mapfile -t HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST}")
else
    IFS=',' read -r -a HOSTS <<< "${SLURM_JOB_NODELIST:-localhost}"
fi
MAIN_ADDR="${HOSTS[0]}"

# Collective hangs fail with a message instead of burning the allocation; logs stay readable.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export TORCH_NCCL_DUMP_ON_TIMEOUT=1
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_DEBUG_SUBSYS="${NCCL_DEBUG_SUBSYS:-INIT,NET}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export PYTHONUNBUFFERED=1

# The command of node $1 (its SLURM_NODEID); the training arguments follow the script's name.
node_command() {
    local node="$1"; shift
    printf '%q ' accelerate launch \
        --config_file "${LAUNCH_CONFIG}" \
        --num_machines "${NNODES}" \
        --num_processes "$((NNODES * GPUS_PER_NODE))" \
        --machine_rank "${node}" \
        --main_process_ip "${MAIN_ADDR}" \
        --main_process_port "${PORT}" \
        -m llmtrain.train "$@" trainer.resume=auto "hydra.run.dir=${RUN_DIR}" \
        "dist.timeout_s=${LLMTRAIN_TIMEOUT_S:-1800}"
    echo
}

run_nodes() {
    if [[ "${DRY_RUN}" == "1" ]]; then
        for ((node = 0; node < NNODES; node++)); do
            echo "node ${node} (${HOSTS[$node]:-?}): $(node_command "${node}" "$@")"
        done
        return 0
    fi
    echo "llmtrain: job ${SLURM_JOB_ID}, ${NNODES} node(s) x ${GPUS_PER_NODE} GPU(s), main ${MAIN_ADDR}:${PORT}, run dir ${RUN_DIR}, restart ${SLURM_RESTART_COUNT:-0}"
    local args
    args="$(printf '%q ' "$@")"
    local rc=0
    # The training processes write their exit code here: the launcher's own code is 1 for
    # any failure of its workers, 75 (preempted) and 2 (config error) included.
    export LLMTRAIN_EXIT_FILE="${RUN_DIR}/.exit-${SLURM_JOB_ID}-${SLURM_RESTART_COUNT:-0}"
    mkdir -p "${RUN_DIR}"
    rm -f "${LLMTRAIN_EXIT_FILE}"
    # One launcher per node; each computes its machine rank from its own SLURM_NODEID.
    # Slurm sends USR1 (--signal=USR1@90) to every process of the step. The launcher and
    # torchrun's agent inherit it as ignored (they would die of it); the training processes
    # install their own handler, save a checkpoint and exit non-zero, which requeues the job.
    # Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: without it each
    # node's launcher, its data workers and its GPU ranks would share one core.
    srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
        ${SLURM_CPUS_PER_TASK:+--cpus-per-task="${SLURM_CPUS_PER_TASK}"} bash -c "
        set -euo pipefail
        source '${SLURM_SCRIPT_DIR}/common.sh'
        trap '' USR1
        cmd=\"\$(node_command \"\${SLURM_NODEID}\" ${args})\"
        eval \"exec \${cmd}\"
    " || rc=$?
    if [[ ${rc} -ne 0 && -s "${LLMTRAIN_EXIT_FILE}" ]]; then
        rc="$(head -n 1 "${LLMTRAIN_EXIT_FILE}")"
    fi
    # 75: preempted (USR1/TERM), a checkpoint was saved. Other failures (a crashed node, a
    # NCCL timeout) resume from the last checkpoint too. 2 is a config, data or checkpoint
    # error, or a run that diverged: a requeue would only fail again.
    if [[ ${rc} -eq 2 ]]; then
        echo "llmtrain: config, data or checkpoint error, or divergence (exit 2); not requeueing, fix the arguments"
    elif [[ ${rc} -ne 0 && "${SLURM_RESTART_COUNT:-0}" -lt "${MAX_REQUEUES}" ]]; then
        echo "llmtrain: training exited with ${rc}; requeueing job ${SLURM_JOB_ID} (resume=auto)"
        scontrol requeue "${SLURM_JOB_ID}"
    elif [[ ${rc} -ne 0 ]]; then
        echo "llmtrain: training exited with ${rc}; not requeueing, job ${SLURM_JOB_ID} was requeued ${MAX_REQUEUES} times already (LLMTRAIN_MAX_REQUEUES)"
    fi
    return "${rc}"
}
