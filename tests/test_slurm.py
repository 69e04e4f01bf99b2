"""slurm/*.sbatch without Slurm: the dry run, and the real path with fake srun/scontrol."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)


def sbatch(script: str, args: list[str], env: dict[str, str], path_dir: Path | None = None):
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **env}
    if path_dir is not None:
        full["PATH"] = f"{path_dir}:{full['PATH']}"
    return subprocess.run(
        ["bash", str(ROOT / "slurm" / script), *args],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=30,
    )


FAKE = {
    "SLURM_JOB_ID": "4242",
    "SLURM_NNODES": "3",
    "SLURM_JOB_NODELIST": "gpu07,gpu08,gpu09",
    "SLURM_GPUS_ON_NODE": "h100:4",
    "SLURM_JOB_NAME": "gpt",
}


def test_multi_node_dry_run_prints_every_node_command():
    out = sbatch(
        "multi-node.sbatch", ["model=gpt2-medium", "dist=zero3"], {**FAKE, "LLMTRAIN_DRY_RUN": "1"}
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    for node, line in enumerate(lines):
        assert line.startswith(f"node {node} (gpu0{7 + node}): accelerate launch ")
        assert "--config_file launch/multi-node.yaml" in line
        assert "--num_machines 3 --num_processes 12" in line
        assert f"--machine_rank {node} " in line
        assert "--main_process_ip gpu07 --main_process_port 24242" in line
        assert "-m llmtrain.train model=gpt2-medium dist=zero3 trainer.resume=auto" in line
        assert "hydra.run.dir=runs/gpt-4242" in line


def test_single_node_dry_run_and_missing_slurm_is_explained():
    out = sbatch(
        "single-node.sbatch",
        ["experiment=smoke"],
        {"SLURM_JOB_ID": "9", "LLMTRAIN_DRY_RUN": "1", "SLURM_GPUS_ON_NODE": "2"},
    )
    assert out.returncode == 0, out.stderr
    assert (
        "--config_file launch/multi-gpu.yaml --num_machines 1 --num_processes 2 "
        "--machine_rank 0 --main_process_ip localhost" in out.stdout
    )
    bad = sbatch("single-node.sbatch", [], {})
    assert bad.returncode != 0 and "SLURM_JOB_ID" in bad.stderr


def test_sbatch_headers_ask_for_signal_and_requeue():
    for script in ("single-node.sbatch", "multi-node.sbatch"):
        text = (ROOT / "slurm" / script).read_text()
        assert "#SBATCH --signal=USR1@90" in text and "#SBATCH --requeue" in text


def _fake_bin(tmp_path: Path, accelerate_rc: int, worker_code: int | None = None) -> Path:
    """srun runs its command once per node with SLURM_NODEID set; accelerate records its args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "srun": '#!/bin/bash\necho "${*:1:$(($# - 3))}" >> "$FAKE_LOG.srun"\n'
        "shift $(($# - 3))\nrc=0\n"
        "for n in $(seq 0 $((SLURM_NNODES - 1))); do\n"
        '  SLURM_NODEID=$n "$@" || rc=$?\ndone\nexit $rc\n',
        "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo gpu07; echo gpu08; echo gpu09;\n'
        'else echo "$@" >> "$FAKE_LOG.scontrol"; fi\n',
        # Like torchrun: the workers' code goes to LLMTRAIN_EXIT_FILE, the launcher exits 1.
        "accelerate": '#!/bin/bash\necho "$*" >> "$FAKE_LOG"\n'
        + (f'echo {worker_code} > "$LLMTRAIN_EXIT_FILE"\n' if worker_code is not None else "")
        + f"exit {accelerate_rc}\n",
    }
    for name, body in scripts.items():
        p = bin_dir / name
        p.write_text(body)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return bin_dir


@pytest.mark.parametrize(
    "launcher_rc, worker_code, rc",
    [(0, None, 0), (1, None, 1), (1, 75, 75), (1, 2, 2), (2, None, 2)],
)
def test_real_path_one_launcher_per_node_and_requeue_on_failure(
    tmp_path, launcher_rc, worker_code, rc
):
    log = tmp_path / "calls"
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[07-09]", "FAKE_LOG": str(log),
           "LLMTRAIN_RUN_DIR": str(tmp_path / "run"), "SLURM_CPUS_PER_TASK": "64"}  # fmt: skip
    out = sbatch("multi-node.sbatch", ["dist=fsdp2"], env,
                 _fake_bin(tmp_path, launcher_rc, worker_code))  # fmt: skip
    assert out.returncode == rc, out.stderr
    calls = log.read_text().splitlines()
    assert [c.split("--machine_rank ")[1].split()[0] for c in calls] == ["0", "1", "2"]
    assert all("--main_process_ip gpu07" in c and "trainer.resume=auto" in c for c in calls)
    # sbatch's --cpus-per-task reaches the step (srun has not inherited it since Slurm 22.05)
    assert "--cpus-per-task=64" in Path(f"{log}.srun").read_text()
    requeued = Path(f"{log}.scontrol")
    assert requeued.is_file() == (rc not in (0, 2))  # 2: config error, never requeued
    if rc not in (0, 2):
        assert requeued.read_text().strip() == "requeue 4242"


def test_requeues_stop_at_llmtrain_max_requeues(tmp_path):
    log = tmp_path / "calls"
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[07-09]", "FAKE_LOG": str(log),
           "LLMTRAIN_RUN_DIR": str(tmp_path / "run"), "SLURM_RESTART_COUNT": "3",
           "LLMTRAIN_MAX_REQUEUES": "3"}  # fmt: skip
    out = sbatch("multi-node.sbatch", ["dist=fsdp2"], env, _fake_bin(tmp_path, 1, 75))
    assert out.returncode == 75 and not Path(f"{log}.scontrol").exists()
    assert "not requeueing, job 4242 was requeued 3 times already" in out.stdout + out.stderr
