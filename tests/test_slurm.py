"""slurm/*.sbatch without Slurm: the dry run, and the real path with fake srun/scontrol."""

import os
import shlex
import signal
import stat
import subprocess
from datetime import datetime
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


def test_port_avoids_ephemeral_range_and_missing_gpu_count_is_said():
    """The default port stays below 32768, where the kernel hands out outgoing ports (a clash
    there would repeat on every requeue); with no GPU count from Slurm the 8 is announced."""
    for job_id in ("54321", "11999", "12000"):
        out = sbatch("single-node.sbatch", [], {"SLURM_JOB_ID": job_id, "LLMTRAIN_DRY_RUN": "1"})
        assert out.returncode == 0, out.stderr
        port = int(out.stdout.split("--main_process_port ")[1].split()[0])
        assert 20000 <= port < 32768
        assert "--num_processes 8 " in out.stdout
        assert "SLURM_GPUS_ON_NODE is not set" in out.stderr
    quiet = sbatch("single-node.sbatch", [], {**FAKE, "LLMTRAIN_DRY_RUN": "1"})
    assert "not set" not in quiet.stderr


def test_submitting_away_from_the_repository_root_is_explained(tmp_path):
    """sbatch runs a copy of the script from its spool folder: common.sh is found through
    SLURM_SUBMIT_DIR, and from elsewhere the job says where to submit from."""
    for script in ("single-node.sbatch", "multi-node.sbatch"):
        copy = tmp_path / script  # what slurmd runs: the script alone
        copy.write_text((ROOT / "slurm" / script).read_text())
        env = {**FAKE, "LLMTRAIN_DRY_RUN": "1", "PATH": os.environ["PATH"]}
        found = subprocess.run(["bash", str(copy)], cwd=ROOT, capture_output=True, text=True,
                               env={**env, "SLURM_SUBMIT_DIR": str(ROOT)})  # fmt: skip
        assert found.returncode == 0 and "accelerate launch" in found.stdout, found.stderr
        lost = subprocess.run(["bash", str(copy)], cwd=tmp_path, capture_output=True, text=True,
                              env={**env, "SLURM_SUBMIT_DIR": str(tmp_path)})  # fmt: skip
        assert lost.returncode == 2
        assert "common.sh not found: submit from the repository root" in lost.stderr
        assert "command not found" not in lost.stderr


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
        # FAKE_SCONTROL_FAILS: this many requeue calls time out first, as a busy slurmctld's
        "scontrol": '#!/bin/bash\nif [ "$1" = show ]; then echo gpu07; echo gpu08; echo gpu09;\n'
        'elif [ "$(cat "$FAKE_LOG.fails" 2>/dev/null | wc -l)" -lt "${FAKE_SCONTROL_FAILS:-0}" ];'
        ' then echo x >> "$FAKE_LOG.fails"; echo "Socket timed out" >&2; exit 1\n'
        'else echo "$@" >> "$FAKE_LOG.scontrol"; fi\n',
        # The job's EndTime as squeue prints it (FAKE_END: none, "N/A" for no time limit)
        "squeue": '#!/bin/bash\necho "$@" >> "$FAKE_LOG.squeue"\necho "${FAKE_END:-N/A}"\n',
        # Like torchrun: the workers' code goes to LLMTRAIN_EXIT_FILE, the launcher exits 1.
        "accelerate": '#!/bin/bash\necho "$*" >> "$FAKE_LOG"\n'
        'printf \'%s\\0\' "$@" > "$FAKE_LOG.args.$SLURM_NODEID"\n'
        "grep '^SigIgn' /proc/$$/status > \"$FAKE_LOG.sigign.$SLURM_NODEID\"\n"
        'echo "${SLURM_JOB_END_TIME:-unset}" > "$FAKE_LOG.end.$SLURM_NODEID"\n'
        + (f'echo {worker_code} > "$LLMTRAIN_EXIT_FILE"\n' if worker_code is not None else "")
        # FAKE_SAVES: this attempt wrote a new checkpoint before it failed
        + 'if [ -n "$FAKE_SAVES" ]; then d="$(dirname "$LLMTRAIN_EXIT_FILE")/checkpoints"; '
        'mkdir -p "$d"; echo "step_$RANDOM$RANDOM" > "$d/latest"; fi\n' + f"exit {accelerate_rc}\n",
    }
    for name, body in scripts.items():
        p = bin_dir / name
        p.write_text(body)
        p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return bin_dir


@pytest.mark.parametrize(
    "launcher_rc, worker_code, rc",
    [(0, None, 0), (1, None, 1), (1, 75, 75), (1, 2, 2), (2, None, 2), (127, None, 127)],
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
    # 2: config error, 127: no launcher on PATH; a requeue would fail the same way
    assert requeued.is_file() == (rc not in (0, 2, 127))
    if requeued.is_file():
        assert requeued.read_text().strip() == "requeue 4242"


@pytest.mark.parametrize(
    "given, squeue_says, launchers_get",
    [
        (None, "2026-11-25T06:07:20", "2026-11-25T06:07:20"),  # Slurm 22.05: from squeue
        ("1795585000", "2026-11-25T06:07:20", "1795585000"),  # Slurm's own is kept
        (None, "N/A", None),  # no time limit: no deadline
        (None, "Unknown", None),
    ],
)
def test_the_jobs_end_reaches_every_launcher_as_slurm_job_end_time(
    tmp_path, given, squeue_says, launchers_get
):
    log = tmp_path / "calls"
    env = {**FAKE, "FAKE_LOG": str(log), "FAKE_END": squeue_says,
           "LLMTRAIN_RUN_DIR": str(tmp_path / "run")}  # fmt: skip
    if given is not None:
        env["SLURM_JOB_END_TIME"] = given
    out = sbatch("multi-node.sbatch", [], env, _fake_bin(tmp_path, 0))
    assert out.returncode == 0, out.stderr
    if launchers_get is None:
        expected = "unset"
    elif launchers_get.isdigit():
        expected = launchers_get
    else:  # local time, as squeue prints it and date reads it
        expected = str(int(datetime.strptime(launchers_get, "%Y-%m-%dT%H:%M:%S").timestamp()))
    got = [Path(f"{log}.end.{node}").read_text().strip() for node in range(3)]
    assert got == [expected] * 3
    # asked once for the job, by the batch script, not by every node or rank
    asked = Path(f"{log}.squeue")
    calls = asked.read_text().splitlines() if asked.is_file() else []
    assert calls == ([] if given else ["-h -j 4242 -o %e"])


def _args(log: Path, node: int) -> list[str]:
    """The exact arguments node ``node``'s launcher received."""
    return Path(f"{log}.args.{node}").read_text().split("\0")[:-1]


def _last(args: list[str], key: str) -> str:
    """The value Hydra uses: the last override of ``key``."""
    return [a for a in args if a.startswith(f"{key}=")][-1].split("=", 1)[1]


def test_preemptions_always_requeue_failures_stop_at_llmtrain_max_requeues(tmp_path):
    """A week under a 24-hour limit is six requeues with exit 75 and a new checkpoint; they do
    not count. Failures (exit 1, or a 75 whose save failed) are requeued LLMTRAIN_MAX_REQUEUES
    times in a row; an attempt that saved a checkpoint, a preemption's included, starts the
    count again."""
    log = tmp_path / "calls"
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[07-09]", "FAKE_LOG": str(log),
           "LLMTRAIN_RUN_DIR": str(tmp_path / "run"), "LLMTRAIN_MAX_REQUEUES": "2"}  # fmt: skip
    (tmp_path / "p").mkdir(), (tmp_path / "c").mkdir()
    preempted, crashed = _fake_bin(tmp_path / "p", 1, 75), _fake_bin(tmp_path / "c", 1)
    saves = {"FAKE_SAVES": "1"}
    requeues = Path(f"{log}.scontrol")
    attempts = [(crashed, {})] + [(preempted, saves)] * 6 + [(crashed, {})] * 2
    attempts += [(preempted, saves), (preempted, {}), (crashed, {}), (crashed, {})]
    for restart, (fake, extra) in enumerate(attempts):
        out = sbatch("multi-node.sbatch", ["dist=fsdp2"],
                     {**env, **extra, "SLURM_RESTART_COUNT": str(restart)}, fake)  # fmt: skip
        assert out.returncode == (75 if fake is preempted else 1)
        assert len(requeues.read_text().splitlines()) == min(restart + 1, len(attempts) - 1)
        if restart == 10:  # preempted, but its save failed: the run made no progress
            assert "without a new checkpoint (exit 75)" in out.stdout
            assert "failure 1 of 2" in out.stdout
    assert "not requeueing, job 4242 failed 2 times in a row" in out.stdout + out.stderr


def test_a_requeue_the_controller_times_out_on_is_tried_again(tmp_path):
    log = tmp_path / "calls"
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[07-09]", "FAKE_LOG": str(log),
           "LLMTRAIN_RUN_DIR": str(tmp_path / "run"), "FAKE_SCONTROL_FAILS": "1",
           "FAKE_SAVES": "1"}  # fmt: skip
    out = sbatch("multi-node.sbatch", ["dist=fsdp2"], env, _fake_bin(tmp_path, 1, 75))
    assert out.returncode == 75
    assert "scontrol requeue 4242 failed; trying again in 5 s" in out.stderr
    assert Path(f"{log}.scontrol").read_text() == "requeue 4242\n"


def _path_without(tmp_path: Path, command: str) -> str:
    """A PATH with every command of /usr/bin:/bin but ``command`` (a Slurm login node has
    scontrol in /usr/bin)."""
    bin_dir = tmp_path / f"no-{command}"
    bin_dir.mkdir()
    for folder in (Path("/usr/bin"), Path("/bin")):
        for tool in folder.iterdir():
            link = bin_dir / tool.name
            if tool.name != command and not link.exists() and not link.is_symlink():
                link.symlink_to(tool)
    return str(bin_dir)


def test_a_bracketed_node_list_without_scontrol_is_refused(tmp_path):
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[01-03,07]", "LLMTRAIN_DRY_RUN": "1",
           "PATH": _path_without(tmp_path, "scontrol")}  # fmt: skip
    out = sbatch("multi-node.sbatch", [], env)
    assert out.returncode == 2 and "needs scontrol to expand it" in out.stderr


def test_the_users_run_dir_resume_and_timeout_win_and_requeues_continue(tmp_path):
    """sbatch ... trainer.resume=<phase 1 checkpoint> hydra.run.dir=X dist.timeout_s=7200: the
    first attempt starts from that checkpoint in X, a requeue continues X's own checkpoints."""
    log, mine = tmp_path / "calls", tmp_path / "phase2"
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[07-09]", "FAKE_LOG": str(log)}
    phase1 = "runs/phase1/checkpoints/step_0001000"
    user = ["dist=fsdp2", f"trainer.resume={phase1}", f"hydra.run.dir='{mine}'",
            "dist.timeout_s=7200"]  # fmt: skip
    out = sbatch("multi-node.sbatch", user, env, _fake_bin(tmp_path, 1, 75))
    assert out.returncode == 75, out.stderr
    for node in range(3):
        args = _args(log, node)
        assert _last(args, "trainer.resume") == phase1
        assert _hydra(_last(args, "hydra.run.dir")) == str(mine)
        assert _last(args, "dist.timeout_s") == "7200"
    assert (mine / ".exit-4242-0").read_text() == "75\n"  # the exit file is in the user's dir
    state = mine / "checkpoints" / "step_0001100" / "trainer_state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{}")
    out = sbatch("multi-node.sbatch", user, {**env, "SLURM_RESTART_COUNT": "1"},
                 tmp_path / "bin")  # fmt: skip
    assert _last(_args(log, 0), "trainer.resume") == "auto"
    assert _hydra(_last(_args(log, 0), "hydra.run.dir")) == str(mine)


def _hydra(value: str) -> str:
    """What Hydra reads from ``value`` on the command line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"hydra.run.dir={value}").value()


@pytest.mark.parametrize("name", ["lr=3e-4,bs=1M", "it's [2]", "plain-name"])
def test_a_run_dir_hydra_would_parse_reaches_it_as_the_path(tmp_path, name):
    """LLMTRAIN_RUN_DIR=/scratch/lr=3e-4 went to Hydra unquoted (a parse error, exit 2), and
    a quoted one became another directory to this script than to Hydra."""
    log, mine = tmp_path / "calls", tmp_path / name
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[07-09]", "FAKE_LOG": str(log)}
    fake = _fake_bin(tmp_path, 1, 75)
    out = sbatch("multi-node.sbatch", ["dist=fsdp2"], {**env, "LLMTRAIN_RUN_DIR": str(mine)}, fake)
    assert out.returncode == 75, out.stderr
    assert _hydra(_last(_args(log, 0), "hydra.run.dir")) == str(mine)
    assert (mine / ".exit-4242-0").read_text() == "75\n"
    log.unlink()
    out = sbatch("multi-node.sbatch", ["dist=fsdp2", f'++hydra.run.dir="{mine}"',
                                       "++trainer.resume=runs/p1/checkpoints/step_0000010"],
                 env, fake)  # fmt: skip
    args = _args(log, 0)
    assert [a for a in args if "hydra.run.dir" in a] == [
        f"hydra.run.dir={_last(args, 'hydra.run.dir')}"
    ]
    assert _hydra(_last(args, "hydra.run.dir")) == str(mine)
    assert [a for a in args if "trainer.resume" in a] == [
        "trainer.resume=runs/p1/checkpoints/step_0000010"
    ]


def test_a_run_dir_the_script_cannot_read_as_hydra_does_is_refused(tmp_path):
    env = {**FAKE, "LLMTRAIN_DRY_RUN": "1"}
    for args, extra in [
        (["hydra.run.dir=/scratch/${oc.env:USER}/run"], {}),
        ([], {"LLMTRAIN_RUN_DIR": "/scratch/a\\b"}),
    ]:
        out = sbatch("multi-node.sbatch", args, {**env, **extra})
        assert out.returncode == 2 and "give the run dir as a plain path" in out.stderr


def test_a_rollback_to_the_run_dirs_own_checkpoint_is_kept_on_the_first_start(tmp_path):
    """sbatch ... trainer.resume=X/checkpoints/step_2 hydra.run.dir=X, X holding step 4: the
    script replaced the named step with auto, so the rollback silently went on from step 4."""
    log, mine = tmp_path / "calls", tmp_path / "run"
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[07-09]", "FAKE_LOG": str(log)}
    for step in (2, 4):
        state = mine / "checkpoints" / f"step_000000{step}" / "trainer_state.json"
        state.parent.mkdir(parents=True)
        state.write_text("{}")
    named = f"{mine}/checkpoints/step_0000002"
    user = ["dist=fsdp2", f"trainer.resume={named}", f"hydra.run.dir={mine}"]
    sbatch("multi-node.sbatch", user, env, _fake_bin(tmp_path, 1, 75))
    assert _last(_args(log, 0), "trainer.resume") == named
    sbatch("multi-node.sbatch", user, {**env, "SLURM_RESTART_COUNT": "1"}, tmp_path / "bin")
    assert _last(_args(log, 0), "trainer.resume") == "auto"  # the requeue: the new branch


def test_arguments_reach_every_launcher_unchanged_and_usr1_is_ignored_there(tmp_path):
    log = tmp_path / "calls"
    env = {**FAKE, "SLURM_JOB_NODELIST": "gpu[07-09]", "FAKE_LOG": str(log),
           "LLMTRAIN_RUN_DIR": str(tmp_path / "run")}  # fmt: skip
    tricky = ["data.files='a/*.txt,b/*.txt'", 'logger.run_name="my run"', "x=$HOME", "y=a;b",
              "z=it's", "*", "w=`id`", "v=a  b"]  # fmt: skip
    out = sbatch("multi-node.sbatch", tricky, env, _fake_bin(tmp_path, 0))
    assert out.returncode == 0, out.stderr
    for node in range(3):
        args = _args(log, node)
        assert args[args.index("llmtrain.train") + 1 :][: len(tricky)] == tricky
        # the launcher must survive Slurm's USR1 (only the training processes handle it)
        ignored = int(Path(f"{log}.sigign.{node}").read_text().split()[1], 16)
        assert ignored & (1 << (signal.SIGUSR1 - 1))


def test_a_job_name_hydra_would_parse_still_gives_a_valid_run_dir():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = sbatch("single-node.sbatch", ["experiment=smoke"],
                 {"SLURM_JOB_ID": "9", "LLMTRAIN_DRY_RUN": "1",
                  "SLURM_JOB_NAME": "gpt lr=3e-4,bs=1M"})  # fmt: skip
    words = shlex.split(out.stdout.split(": ", 1)[1])
    run_dir = [w for w in words if w.startswith("hydra.run.dir=")]
    assert run_dir == ["hydra.run.dir=runs/gpt_lr_3e-4_bs_1M-9"]
    OverridesParser.create().parse_overrides(run_dir)


def test_usr1_to_the_batch_script_reaches_the_step_and_requeues(tmp_path):
    """--signal=B:USR1@90 (scancel --batch -s USR1) signals the batch shell only: it died of
    it (exit 138) and the job ended unsaved, never requeued."""
    import time

    log = tmp_path / "calls"
    bin_dir = _fake_bin(tmp_path, 1)
    # The step: waits for USR1, then does what the training processes do with it.
    (bin_dir / "srun").write_text(
        '#!/bin/bash\ntrap \'echo 75 > "$LLMTRAIN_EXIT_FILE"; d="$(dirname "$LLMTRAIN_EXIT_FILE")'
        '/checkpoints"; mkdir -p "$d"; echo step_1 > "$d/latest"; exit 1\' USR1\n'
        'echo "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" > "$FAKE_LOG.timeout"\n'
        'touch "$FAKE_LOG.ready"\nfor _ in $(seq 300); do sleep 0.1; done\n'
    )
    env = {**FAKE, "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "FAKE_LOG": str(log), "LLMTRAIN_RUN_DIR": str(tmp_path / "run")}  # fmt: skip
    proc = subprocess.Popen(
        ["bash", str(ROOT / "slurm" / "single-node.sbatch"), "dist=ddp"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not Path(f"{log}.ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, out + err
    assert "USR1 reached the batch script" in out
    assert Path(f"{log}.scontrol").read_text() == "requeue 4242\n"
    # a SIGTERM's save gets 180 s before torchrun's agent kills the workers (torch's own: 30)
    assert Path(f"{log}.timeout").read_text() == "180\n"


def test_usr1_as_the_step_ends_well_is_no_failure(tmp_path):
    """A USR1 cuts the batch shell's wait short (138); the status it then takes must be srun's.
    (Where bash had reaped srun before the trap ran, it took the 138 and requeued a finished
    job as a failure: a race this test meets only sometimes.)"""
    log = tmp_path / "calls"
    bin_dir = _fake_bin(tmp_path, 1)
    # the step ends well as the signal comes (srun passes it on to tasks that are done)
    (bin_dir / "srun").write_text(
        "#!/bin/bash\ntrap '' USR1\nkill -USR1 $(ps -o ppid= -p $PPID)\nexit 0\n"
    )  # the batch shell: srun's parent is the subshell that records its status
    env = {**FAKE, "FAKE_LOG": str(log), "LLMTRAIN_RUN_DIR": str(tmp_path / "run")}
    for _ in range(3):
        out = sbatch("single-node.sbatch", ["dist=ddp"], env, bin_dir)
        assert out.returncode == 0, out.stdout + out.stderr
    assert not Path(f"{log}.scontrol").exists()
