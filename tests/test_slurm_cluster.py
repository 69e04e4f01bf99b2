"""slurm/single-node.sbatch on a real Slurm cluster: stopped by a signal, saved, requeued and
resumed, and the run ends with the losses an unbroken one logs, step for step.

Opt-in, since it submits jobs: ``LLMTRAIN_SLURM_PARTITION=<partition>`` names where (a node
with 2 CPU cores is enough; no GPU is asked for; the multi-node case needs 2 nodes and is
skipped on a partition of one). ``LLMTRAIN_SLURM_PREEMPTOR=<partition>``
also runs the preemption test: a partition whose jobs preempt the first one's with
``PreemptMode=REQUEUE`` (Slurm then sends SIGTERM and requeues the job itself). The run dirs
and Slurm logs go under ``runs/slurm-tests/`` of the repository, which the compute node must
see. Each requeue waits out Slurm's own delay before a requeued job starts again (about two
minutes), so the tests take several minutes each.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTITION = os.environ.get("LLMTRAIN_SLURM_PARTITION", "")
PREEMPTOR = os.environ.get("LLMTRAIN_SLURM_PREEMPTOR", "")

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        not PARTITION or shutil.which("sbatch") is None,
        reason="submits Slurm jobs: set LLMTRAIN_SLURM_PARTITION (and have sbatch on PATH)",
    ),
]

STEPS = 60
TRAIN = [
    "experiment=smoke",
    "dist=ddp",
    f"trainer.max_steps={STEPS}",
    "trainer.ckpt_every=1000",  # the only checkpoints are the signals' and the last step's
    "trainer.eval_every=30",
    "trainer.sample_every=0",
]


def submit(
    name: str, workdir: Path, *sbatch_args: str, train: list[str] = TRAIN, nodes: int = 1
) -> str:
    """The job id of slurm/single-node.sbatch run as 2 CPU processes of one node, or of
    multi-node.sbatch as 1 process on each of 2 ``nodes``: the same 2 ranks either way."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # accelerate
        "WANDB_MODE": "disabled",
        "LLMTRAIN_GPUS_PER_NODE": str(2 // nodes),
        "LLMTRAIN_LAUNCH_CONFIG": "launch/cpu.yaml",
        "LLMTRAIN_RUN_DIR": str(workdir / name),
        "OMP_NUM_THREADS": "1",
    }
    script = "slurm/single-node.sbatch" if nodes == 1 else "slurm/multi-node.sbatch"
    out = subprocess.run(
        ["sbatch", "--parsable", f"--partition={PARTITION}", f"--job-name={name}",
         f"--output={workdir}/{name}.out", "--gpus-per-node=0", f"--nodes={nodes}",
         f"--cpus-per-task={2 // nodes}", "--time=20", *sbatch_args, script, *train],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0 and nodes > 1 and "node configuration is not available" in out.stderr:
        pytest.skip(f"partition {PARTITION} has fewer than {nodes} nodes")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def trained_to(run_dir: Path) -> int:
    return max((row["step"] for row in metrics(run_dir) if "loss" in row), default=0)


def log(workdir: Path, name: str) -> str:
    path = workdir / f"{name}.out"
    return path.read_text() if path.is_file() else ""


def queued(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
    return bool(out.stdout.strip())


def wait_for(what: str, done, jobs: list[str], workdir: Path, name: str, timeout_s=900):
    end = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > end:
            subprocess.run(["scancel", *jobs])
            pytest.fail(f"{what}: not within {timeout_s} s; the log:\n{log(workdir, name)[-3000:]}")
        time.sleep(2)


def losses(rows: list[dict]) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


@pytest.fixture(scope="module")
def workdir() -> Path:
    path = ROOT / "runs" / "slurm-tests" / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def unbroken(workdir) -> list[dict]:
    """The run's metrics with no signal: what a stopped and requeued run must log too."""
    job = submit("unbroken", workdir)
    wait_for("the unbroken run", lambda: not queued(job), [job], workdir, "unbroken")
    rows = metrics(workdir / "unbroken")
    assert trained_to(workdir / "unbroken") == STEPS, log(workdir, "unbroken")[-3000:]
    return rows


@pytest.mark.parametrize("nodes", [1, 2])
def test_usr1_to_the_step_and_to_the_batch_script_save_requeue_and_resume(workdir, unbroken, nodes):
    """``--signal=USR1@T`` signals the step's processes, ``--signal=B:USR1@T`` the batch script
    (which passes it on): ``scancel --signal`` sends each form now. On 2 nodes (one launcher
    on each, multi-node.sbatch) the 2 ranks train as on one."""
    name = f"usr1-{nodes}-node"
    run_dir = workdir / name
    job = submit(name, workdir, nodes=nodes)

    def signal_at(step: int, restart: int, *how: str) -> None:
        wait_for(f"restart {restart} to pass step {step}",
                 lambda: f"restart {restart}" in log(workdir, name) and trained_to(run_dir) >= step,
                 [job], workdir, name)  # fmt: skip
        subprocess.run(["scancel", "--signal=USR1", *how, job], check=True)

    signal_at(20, 0)  # the step's processes: the training ranks catch it
    signal_at(40, 1, "--batch")  # the batch script's trap passes it to srun
    wait_for("the run to end", lambda: not queued(job), [job], workdir, name, timeout_s=1200)

    text = log(workdir, name)
    assert text.count("stopped by SIGUSR1 after step") == 2, text[-3000:]
    assert text.count("requeueing job") == 2
    assert "USR1 reached the batch script" in text
    assert len(re.findall(r"resumed +from .*step_\d+ at step \d+", text)) == 2
    assert "restart 3" not in text
    assert losses(metrics(run_dir)) == losses(unbroken)
    assert (run_dir / "checkpoints" / f"step_{STEPS:07d}").is_dir()


@pytest.mark.skipif(not PREEMPTOR, reason="set LLMTRAIN_SLURM_PREEMPTOR to a preempting partition")
def test_a_preemption_saves_on_sigterm_and_slurm_requeues_it(workdir, unbroken):
    name = "preempted"
    run_dir = workdir / name
    job = submit(name, workdir)
    wait_for("the run to pass step 20", lambda: trained_to(run_dir) >= 20, [job], workdir, name)
    node = subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    # A job of the preempting partition that needs the node's cores
    subprocess.run(
        ["sbatch", f"--partition={PREEMPTOR}", f"--nodelist={node}", "--exclusive",
         f"--output={workdir}/preemptor.out", "--wrap", "sleep 5"],
        check=True, capture_output=True,
    )  # fmt: skip
    wait_for("the run to end", lambda: not queued(job), [job], workdir, name, timeout_s=1200)

    text = log(workdir, name)
    assert "stopped by SIGTERM after step" in text, text[-3000:]
    assert re.search(r"resumed +from .*step_\d+ at step \d+", text)
    assert losses(metrics(run_dir)) == losses(unbroken)


def test_the_jobs_end_stops_the_run_in_time_to_save_and_requeue(workdir):
    """Slurm 22.05 sets no SLURM_JOB_END_TIME: the batch script asks squeue, and the run stops
    on its own before the job's end less the requeue margin (a USR1 at the very end,
    ``--signal=USR1@1``, comes too late to be the stop)."""
    name = "deadline"
    train = [*TRAIN[:2], "trainer.max_steps=100000", "trainer.eval_every=100000",
             "trainer.sample_every=0", "trainer.ckpt_every=20"]  # fmt: skip
    job = submit(name, workdir, "--time=2", "--signal=USR1@1", train=train)
    wait_for("the stop before the job's end", lambda: "requeueing job" in log(workdir, name),
             [job], workdir, name, timeout_s=600)  # fmt: skip
    subprocess.run(["scancel", job], check=True)

    text = log(workdir, name)
    assert "time limit stops with a checkpoint before" in text, text[-3000:]
    stop = re.search(r"stopped before the time limit \(the Slurm job's end.*after step (\d+)", text)
    assert stop, text[-3000:]
    assert (workdir / name / "checkpoints" / f"step_{int(stop[1]):07d}").is_dir()


def test_a_killed_rank_is_requeued_and_the_run_resumes_from_its_last_checkpoint(workdir, unbroken):
    """A rank killed outright (a crashed node, the OOM killer) saves nothing: the job is
    requeued as a failure and goes on from the last periodic checkpoint, logging the steps
    after it again."""
    name = "killed"
    run_dir = workdir / name
    train = [a for a in TRAIN if not a.startswith("trainer.ckpt_every=")]
    job = submit(name, workdir, train=[*train, "trainer.ckpt_every=20"])
    wait_for("the run to pass step 25", lambda: trained_to(run_dir) >= 25, [job], workdir, name)
    kill = ["pkill", "--signal", "KILL", "--newest", "--full", "[-]m llmtrain[.]train"]
    subprocess.run(["srun", f"--jobid={job}", "--overlap", "--ntasks=1", *kill], check=True)
    wait_for("the run to end", lambda: not queued(job), [job], workdir, name, timeout_s=1200)

    text = log(workdir, name)
    assert "requeueing job" in text and "failure 1 of" in text, text[-3000:]
    assert re.search(r"resumed +from .*step_00000[24]0 at step [24]0", text), text[-3000:]
    assert losses(metrics(run_dir)) == losses(unbroken)
