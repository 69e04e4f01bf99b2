"""The README's commands, as a user pastes them: every training command composes and passes
validation at its launcher's world size, and every llmtrain-plan command runs (the GPU and
Slurm ones cannot run here; a missing horizon or a batch that does not divide would still
fail on the cluster at once)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from llmtrain.config import load_config
from llmtrain.plan import main as plan_main

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """Every line of the README's bash blocks, continuation lines joined, comments dropped."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("  #")[0].split(" # ")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def training_run(command: str) -> tuple[list[str], int] | None:
    """(Hydra overrides, world size) of a command that trains; None for any other command."""
    words = [w for w in shlex.split(command) if not re.match(r"^[A-Z_]+=", w)]  # not VAR=...
    if "llmtrain-train" in words:
        return words[words.index("llmtrain-train") + 1 :], 1
    if "llmtrain.train" in words:  # accelerate launch --config_file launch/X.yaml -m ...
        config = yaml.safe_load((REPO / words[words.index("--config_file") + 1]).read_text())
        return words[words.index("llmtrain.train") + 1 :], config["num_processes"]
    script = next((w for w in words if w.startswith("slurm/") and w.endswith(".sbatch")), None)
    if script is not None:
        header = (REPO / script).read_text()
        per_node = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", header).group(1))
        nodes = re.search(r"(?:--nodes=|SLURM_NNODES=)(\d+)", command)
        return words[words.index(script) + 1 :], per_node * int(nodes.group(1) if nodes else 1)
    return None


def commented_commands() -> list[str]:
    """The example commands in the comments of the sbatch scripts, launch configs and
    experiment files (what a user copies from the file they are reading)."""
    commands = []
    for path in [*REPO.glob("slurm/*.sbatch"), *REPO.glob("launch/*.yaml"),
                 *REPO.glob("conf/experiment/*.yaml")]:  # fmt: skip
        comments = [line[1:] for line in path.read_text().splitlines() if line.startswith("#")]
        for line in "\n".join(comments).replace("\\\n", " ").splitlines():
            start = min((i for w in STARTS if (i := line.find(w)) >= 0), default=-1)
            if start >= 0 and "=" in line:
                commands.append(line[start:].strip())
    return commands


STARTS = ("accelerate launch ", "sbatch ", "llmtrain-train ")
COMMANDS = readme_commands() + commented_commands()
RUNS = {c: r for c in COMMANDS if (r := training_run(c)) is not None}


def test_the_readme_has_the_commands_this_file_checks():
    assert len(RUNS) >= 18  # quickstart, overrides, resume, launchers, Slurm, shards; headers
    assert any(world == 32 for _, world in RUNS.values())  # sbatch --nodes=4


@pytest.mark.parametrize("command", list(RUNS))
def test_every_training_command_composes_at_its_world_size(command):
    overrides, world = RUNS[command]
    load_config([o for o in overrides if not o.startswith("hydra.")], world_size=world)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.startswith("llmtrain-plan")])
def test_every_plan_command_runs(command, capsys):
    # 0 fits, 3 does not (the README asks "fits?" of a 24 GB card); 2 would be a refused config
    assert plan_main(shlex.split(command)[1:]) in (0, 3), capsys.readouterr().err


# The Hub samples' sizes, from the dataset cards ("around N gpt2 tokens").
SAMPLE_TOKENS = {"sample-10BT": 10e9, "sample-100BT": 100e9, "sample-350BT": 350e9}


@pytest.mark.parametrize("command", list(RUNS))
def test_no_command_trains_past_the_end_of_its_corpus(command):
    """A Llama-3B command trained 60B tokens on sample-10BT: six epochs, said nowhere."""
    from llmtrain.startup import Plan

    overrides, world = RUNS[command]
    cfg = load_config([o for o in overrides if not o.startswith("hydra.")], world_size=world)
    size = SAMPLE_TOKENS.get(cfg.data.config_name or "")
    if cfg.data.name in ("fineweb", "fineweb-edu") and size is not None:
        run = Plan.from_config(cfg, world)
        assert run.max_steps * run.tokens_per_step <= 1.01 * size  # "around": 10B, not 20B
