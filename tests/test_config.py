"""llmtrain.config: composition from conf/, the shipped experiments, and errors that name the
offending key."""

import re

import pytest

from llmtrain.config import (
    CONF_DIR,
    ConfigError,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
)
from llmtrain.plan import plan
from llmtrain.startup import Plan

BASE = ["trainer.max_steps=1"]


def test_gpt2_small_loads():
    cfg = load_config(["model=gpt2-small", *BASE])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (12, 12, 768)
    assert cfg.trainer.max_steps == 1


def test_llama_sizes_inherit_llama_style():
    model = load_config(["model=llama-1b", *BASE]).model
    assert (model.position, model.norm, model.mlp) == ("rope", "rmsnorm", "swiglu")
    assert model.n_kv_head == 8 and model.tie_embeddings and not model.bias


def test_experiment_pins_a_run():
    cfg = load_config(["experiment=smoke"])
    assert cfg.experiment == "smoke" and cfg.model.name == "tiny"
    assert cfg.trainer.max_steps == 100


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.foo=1"], "foo"),
        (["model=nope"], "nope"),
        (["model.n_layer=abc"], "n_layer"),
        (["model.n_embd=130"], "model.n_embd"),  # tiny has 4 heads
        (["model.n_kv_head=3"], "model.n_kv_head"),
        (["data.seq_len=512"], "data.seq_len"),  # tiny's context_length is 256
        (["model.n_layer=0"], "model.n_layer"),
        (["model.n_embd=-64"], "model.n_embd"),
        (["model.vocab_size=0"], "model.vocab_size"),
        (["data.seq_len=0"], "data.seq_len"),
        (["trainer.micro_batch_size=0"], "trainer.micro_batch_size"),
        (["optim.lr=0"], "optim.lr"),
        (["trainer.batch_tokens=1000"], "trainer.batch_tokens"),
        (["model.position=alibi"], "model.position"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config([*overrides, *BASE])


def test_missing_horizon_is_an_error():
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config([])


def test_batch_tokens_divisibility_counts_world_size():
    overrides = ["trainer.batch_tokens=4096", "trainer.micro_batch_size=16", *BASE]
    load_config(overrides, world_size=2)  # 16 x 128 x 2 = 4096
    with pytest.raises(ConfigError, match="trainer.batch_tokens"):
        load_config(overrides, world_size=3)


def test_dict_round_trip():
    cfg = load_config(["model=llama-1b", "trainer.max_steps=7", "logger=none"])
    data = config_to_dict(cfg)
    assert data["model"]["n_kv_head"] == 8
    assert config_from_dict(data) == cfg
    assert "n_kv_head: 8" in config_to_yaml(cfg)


def test_from_dict_rejects_unknown_keys():
    data = config_to_dict(load_config(BASE))
    data["model"]["foo"] = 1
    with pytest.raises(Exception, match="foo"):
        config_from_dict(data)


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_with_the_launchers_it_is_meant_for(name):
    # smoke: one CPU process or launch/cpu.yaml's two; the GPU recipes: one GPU or a node of 8.
    for world in (1, 2) if name == "smoke" else (1, 8):
        cfg = load_config([f"experiment={name}"], world_size=world)
        assert cfg.experiment == name  # the receipt names the file that pinned the run
        assert cfg.trainer.max_steps or cfg.trainer.max_tokens


@pytest.mark.parametrize(
    "name, world, accum, tokens, fits_in",
    [
        # nanoGPT / llm.c's GPT-2 124M run: 19,073 steps of 524,288 tokens = 10B tokens.
        ("gpt2-124m-fineweb", 1, 16, 9_999_745_024, 80),
        ("gpt2-124m-fineweb", 8, 2, 9_999_745_024, 40),
        ("llama-1b-fineweb-edu", 8, 8, 19_999_490_048, 80),
    ],
)
def test_the_recipes_are_the_runs_their_headers_describe(name, world, accum, tokens, fits_in):
    overrides = [f"experiment={name}"] + (["dist=fsdp2"] if "llama" in name else [])
    cfg = load_config(overrides, world_size=world)
    run = Plan.from_config(cfg, world)
    assert (run.grad_accum, run.max_steps * run.tokens_per_step) == (accum, tokens)
    assert cfg.trainer.precision == "bf16" and cfg.trainer.compile
    assert cfg.data.name.startswith("fineweb") and cfg.data.seq_len <= cfg.model.context_length
    memory = plan(cfg, world, gpu_mem_gb=fits_in)
    assert memory.fits, f"{name} on {world} GPU(s) does not fit {fits_in} GiB"


@pytest.mark.parametrize(
    "line, key", [("n_heads: 4", "model.n_heads"), ("n_layer: two", "model.n_layer")]
)
def test_a_group_file_is_typed_by_the_root_schema(tmp_path, monkeypatch, line, key):
    """Only TrainConfig is registered (per-group schemas cluttered --help); a group file with
    a misspelt key or a wrong type must still fail, naming the key."""
    import shutil

    import llmtrain.config as config_mod

    conf = tmp_path / "conf"
    shutil.copytree(config_mod.CONF_DIR, conf)
    (conf / "model" / "mine.yaml").write_text(f"name: mine\n{line}\n")
    monkeypatch.setattr(config_mod, "CONF_DIR", conf)
    with pytest.raises(ConfigError, match=key):
        load_config(["model=mine", "trainer.max_steps=1"])


def test_the_wheel_carries_the_configs(tmp_path):
    """`pip install llmtrain` (not -e) had no conf/: every command failed to compose."""
    import subprocess
    import sys
    import zipfile

    pytest.importorskip("setuptools", minversion="70.1")  # builds wheels without `wheel`
    import shutil

    repo, src = CONF_DIR.parent, tmp_path / "src"  # built from a copy: no build/ in the repo
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ("llmtrain", "conf"):
        shutil.copytree(repo / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(repo / name, src / name)
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("llmtrain-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"llmtrain/conf/{p.relative_to(CONF_DIR)}" for p in CONF_DIR.rglob("*.yaml")}
    assert want <= names and "llmtrain/conf/experiment/smoke.yaml" in want
    assert "llmtrain/assets/gpt2.tiktoken" in names


# Tokens in the Hub samples a data group's config_name picks (the dataset cards: "around N
# gpt2 tokens"); a run past them repeats its corpus without a word (train loaders loop).
SAMPLE_TOKENS = {"sample-10BT": 10e9, "sample-100BT": 100e9, "sample-350BT": 350e9}


@pytest.mark.parametrize("name", ["gpt2-124m-fineweb", "llama-1b-fineweb-edu"])
def test_no_recipe_trains_past_the_end_of_its_corpus(name):
    """llama-1b-fineweb-edu said 20B tokens of FineWeb-Edu and streamed sample-10BT twice."""
    cfg = load_config([f"experiment={name}"], world_size=8)
    run = Plan.from_config(cfg, 8)
    assert run.max_steps * run.tokens_per_step <= 1.01 * SAMPLE_TOKENS[cfg.data.config_name]


def test_the_wsd_recipe_keeps_a_checkpoint_to_extend_from():
    """Its header says the run can be extended from a checkpoint taken before the decay; with
    keep_last=3 the last one of those (step 15,000) was pruned by step 18,000."""
    cfg = load_config(["experiment=llama-1b-fineweb-edu"], world_size=8)
    t, o = cfg.trainer, cfg.optim
    decay_start = t.max_steps - round(o.decay_fraction * t.max_steps)
    saved = list(range(t.ckpt_every, t.max_steps + 1, t.ckpt_every))
    saved += [t.max_steps] if t.max_steps % t.ckpt_every else []
    kept = saved[-t.keep_last :]  # checkpoint.prune: the newest keep_last
    assert min(kept) <= decay_start


def test_a_batch_that_does_not_split_suggests_the_micro_batch_that_keeps_it():
    """On 64 GPUs the 124M recipe was told 'try 2097152': four times the recipe's batch."""
    keep = r"try 2097152 \(4x the global batch\), or trainer.micro_batch_size=8, which keeps it"
    with pytest.raises(ConfigError, match=keep):
        load_config(["experiment=gpt2-124m-fineweb"], world_size=64)
    with pytest.raises(ConfigError, match="try 491520") as e:  # 3 GPUs: no micro-batch fits
        load_config(["experiment=gpt2-124m-fineweb"], world_size=3)
    assert "micro_batch_size=" not in str(e.value).split("try")[1]


@pytest.mark.parametrize(
    "override, says",
    [
        ("trainer.max_steps=${oc.env:LLMTRAIN_TEST_UNSET}", "LLMTRAIN_TEST_UNSET"),
        ("trainer.max_steps=${trainer.nope}", "trainer.nope"),
        ("trainer.max_steps=${oc.env:HOME}", "could not be converted"),
    ],
)
def test_an_interpolation_that_does_not_resolve_names_the_key(override, says, monkeypatch):
    """An unset environment variable was a 60-line OmegaConf traceback and exit 1 (requeued)."""
    monkeypatch.delenv("LLMTRAIN_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match="trainer.max_steps") as e:
        load_config(["experiment=smoke", override])
    assert says in str(e.value)


@pytest.mark.parametrize("override", ["+experiment=smoke", "+model=tiny"])
def test_plus_group_is_told_to_drop_the_plus(override):
    """Hydra's docs write +experiment=...; here experiment is in the defaults, and Hydra's
    answer was to write 'override experiment: smoke' in a YAML file."""
    with pytest.raises(ConfigError, match=override.lstrip("+")) as e:
        load_config([override, "trainer.max_steps=1"])
    assert "without the '+'" in str(e.value)


def test_seq_len_past_the_context_says_what_to_set():
    with pytest.raises(ConfigError, match="data.seq_len=256"):
        load_config(["model=tiny", "data=fineweb", "trainer.max_steps=1"])


def test_runs_started_in_the_same_second_get_their_own_dirs():
    """Two runs launched together (a sweep of `llmtrain-train ... &`) shared runs/DATE/TIME:
    one config.yaml, one metrics.jsonl, and both died writing the same checkpoint."""
    from datetime import datetime

    import yaml

    pattern = yaml.safe_load((CONF_DIR / "train.yaml").read_text())["hydra"]["run"]["dir"]

    def resolved(now):
        return re.sub(r"\$\{now:([^}]*)\}", lambda m: now.strftime(m.group(1)), pattern)

    a = resolved(datetime(2026, 1, 1, 12, 0, 0, 1))
    b = resolved(datetime(2026, 1, 1, 12, 0, 0, 500_000))
    assert "${" not in a and a != b


@pytest.mark.parametrize(
    "override, hint",
    [
        ("~trainer.max_steps", "to unset one, write trainer.max_steps=null"),  # Hydra's delete
        ("trainer.max_tokens=1e10", "10_000_000_000, not 1e10"),  # YAML reads 1e10 as a float
    ],
)
def test_hydra_errors_that_only_say_what_went_wrong_say_what_to_write(override, hint):
    with pytest.raises(ConfigError, match=hint):
        load_config([override])
    with pytest.raises(ConfigError, match=hint):  # an experiment's value: another Hydra message
        load_config(["experiment=smoke", override])


@pytest.mark.parametrize(
    "override, meant",
    [
        ("lr=1e-3", "optim.lr"),  # nanoGPT's names, no section: no hint at all before
        ("max_iters=100", "trainer.max_steps"),
        ("model.block_size=256", "model.context_length"),  # was "model.vocab_size"
        ("trainer.lr=1e-3", "optim.lr"),  # the right name in the wrong section
        ("trainer.warmup_steps=10", "optim.warmup_steps"),  # was "trainer.max_steps"
        ("optim.learning_rate=1e-3", "optim.lr"),
        ("+dist.zero_stage=2", "dist=zero1, dist=zero2 or dist=zero3"),
        ("model.n_layers=2", "model.n_layer"),  # a close name in its own section
        ("name=x", "model.name or data.name or optim.name or logger.name"),
    ],
)
def test_a_foreign_or_misplaced_key_names_the_setting_meant(override, meant):
    with pytest.raises(ConfigError, match=re.escape(f"id you mean {meant}")):
        load_config(["experiment=smoke", override])
