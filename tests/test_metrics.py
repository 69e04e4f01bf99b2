import json
import math
import time
from dataclasses import replace

import pytest

from llmtrain.config import load_config
from llmtrain.metrics import (
    MetricsFile,
    NullLogger,
    Pace,
    Throughput,
    build_logger,
    console_line,
    device_peak_tflops,
    flops_per_token,
    matmul_params,
    mfu,
    perplexity,
)


def test_flops_per_token_gpt2_small_by_hand():
    cfg = load_config(["model=gpt2-small", "trainer.max_steps=1"]).model
    d, layers, vocab_padded, seq = 768, 12, 50304, 1024
    per_layer = 4 * d * d + 2 * d * 4 * d  # q, k, v, out projections + the two MLP matrices
    n = layers * per_layer + d * vocab_padded  # blocks + output head (embeddings are lookups)
    assert matmul_params(cfg) == n == 123_568_128
    assert flops_per_token(cfg, seq) == 6 * n + 12 * layers * d * seq
    assert flops_per_token(cfg, seq) == pytest.approx(0.8547e9, rel=1e-3)


def test_flops_against_llm_c_count():
    """llm.c's gpt2_estimate_mfu: 6 x every parameter + 6 * L * C * T (the causal half). The
    README's figures: at the same tokens/s, its MFU reads ~6% below this one."""
    cfg = load_config(["model=gpt2-small", "trainer.max_steps=1"]).model
    n_all = 124_475_904  # wte (padded, tied) + wpe + blocks + ln_f
    llm_c = 6 * n_all + 6 * 12 * 768 * 1024
    assert llm_c == pytest.approx(803.5e6, abs=0.05e6)
    assert flops_per_token(cfg, 1024) == pytest.approx(854.7e6, abs=0.05e6)
    assert flops_per_token(cfg, 1024) / llm_c == pytest.approx(1.064, abs=0.001)


def test_flops_swiglu_and_gqa():
    cfg = load_config(["model=llama-1b", "trainer.max_steps=1"]).model
    d, kv_dim, ffn = 2048, 8 * 64, 8192
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * ffn
    assert matmul_params(cfg) == 16 * per_layer + d * 50304
    narrow = load_config(["model=llama-1b", "model.ffn_hidden=5632", "trainer.max_steps=1"])
    assert matmul_params(cfg) - matmul_params(narrow.model) == 16 * 3 * d * (ffn - 5632)


def test_throughput_is_the_current_interval_s(monkeypatch):
    """tokens/s and the data-wait fraction over the time since the last reset only."""
    now = [102.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    meter = Throughput(start=100.0, tokens=4000, data_wait=0.5)
    assert meter.read() == (2000.0, 0.25)
    meter.reset()
    meter.tokens += 1000
    now[0] = 106.0
    assert meter.read() == (250.0, 0.0)


def test_mfu_against_peak_table():
    assert device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert device_peak_tflops("NVIDIA L40S") == 362.0
    assert device_peak_tflops("NVIDIA L4") == 121.0
    # Whole words: an L40 is not an L4 (121), an H800 PCIe not an SXM H800 (989).
    assert device_peak_tflops("NVIDIA L40") == 181.0
    assert device_peak_tflops("NVIDIA H800 PCIe") == 756.0
    assert device_peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert device_peak_tflops("NVIDIA H200 NVL") == 835.0
    assert device_peak_tflops("Some Future GPU") is None
    assert device_peak_tflops("NVIDIA H100 80GB HBM3 MIG 1g.10gb") is None  # a slice, not 989
    assert device_peak_tflops(None) is None
    # 500k tokens/s at 0.8547 GFLOP/token on a 989 TFLOP/s device: 43.2% MFU
    assert mfu(500e3, 0.8547e9, 989.0) == pytest.approx(500e3 * 0.8547e9 / 989e12)
    assert mfu(500e3, 0.8547e9, None) is None  # unknown device: absent, never a made-up peak


def test_perplexity_is_exp_loss():
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))
    assert perplexity(1e4) == float("inf")
    assert perplexity(50.0) == pytest.approx(math.exp(50.0))  # finite: it was inf from 50


def test_metrics_file_jsonl(tmp_path):
    f = MetricsFile(tmp_path / "metrics.jsonl")
    f.write({"step": 1, "loss": 3.0})
    f.write({"step": 1, "val_loss": 2.5, "val_ppl": math.exp(2.5)})
    f.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 1, "loss": 3.0} and "val_ppl" in lines[1]
    MetricsFile(None).write({"step": 1})  # non-main ranks write nothing


def test_metrics_file_after_resume_holds_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    f = MetricsFile(path)
    for step in range(1, 8):  # a run checkpointed at step 5, then cut off after step 7
        f.write({"step": step, "loss": float(step)})
    f.close()
    with path.open("a") as torn:
        torn.write('{"step": 8, "lo')
    f = MetricsFile(path, resumed_at=5)
    assert f.logged_past == 7  # the steps 6 and 7 the resume trains again (the torn 8 is not)
    for step in range(6, 9):
        f.write({"step": step, "loss": -float(step)})
    f.close()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["loss"] for r in records[5:]] == [-6.0, -7.0, -8.0]
    MetricsFile(path).close()  # a fresh run starts the file anew
    assert path.read_text() == ""


def test_logger_none_and_non_main_are_no_ops(tmp_path):
    cfg = load_config(["logger=none", "trainer.max_steps=1"]).logger
    assert isinstance(build_logger(cfg, tmp_path, {}, is_main=True), NullLogger)
    wandb_cfg = load_config(["logger=wandb", "trainer.max_steps=1"]).logger
    assert isinstance(build_logger(wandb_cfg, tmp_path, {}, is_main=False), NullLogger)


def test_console_line_is_readable():
    r = {
        "step": 10,
        "loss": 3.21,
        "ppl": 24.8,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens_per_s": 12345.0,
        "mfu": None,
        "peak_mem_gb": 1.5,
        "data_wait": 0.01,
    }
    line = console_line(r, 100, 65)
    assert "step     10/100" in line and "loss 3.2100" in line and "mfu   n/a" in line
    assert "eta 0:01:05" in line and "grad 0.500" in line and "   12.3k tok/s" in line
    # Tiny and huge values keep their digits: a grad of 4e-4 printed 0.000 (the all-zero
    # gradient that stops a run), a loss of 45 a ppl twenty digits long, 12 tok/s '0.0k'.
    tiny = console_line(r | {"loss": 3e-6, "ppl": 1.000003, "grad_norm": 4e-4,
                             "tokens_per_s": 12.3}, 100, 65)  # fmt: skip
    assert "loss 3.000e-06" in tiny and "grad 4.000e-04" in tiny and "    12.3  tok/s" in tiny
    huge = console_line(r | {"loss": 45.0, "ppl": perplexity(45.0), "grad_norm": 1e8}, 100, 65)
    assert "loss 45.0000" in huge and "ppl 3.493e+19" in huge and "grad 1.000e+08" in huge


def test_metrics_file_holds_strict_json(tmp_path):
    """A ppl past float range (or a NaN) was written as Infinity, which strict JSON readers
    refuse; it is null now."""
    f = MetricsFile(tmp_path / "metrics.jsonl")
    f.write({"step": 1, "loss": 800.0, "ppl": perplexity(800.0), "grad_norm": float("nan")})
    f.close()
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line) == {"step": 1, "loss": 800.0, "ppl": None, "grad_norm": None}
    assert "Infinity" not in line and "NaN" not in line


class FakeRun:
    """What wandb.init returns, as far as WandbLogger uses it."""

    def __init__(self):
        self.metrics = {}

    def define_metric(self, name, summary=None):
        self.metrics[name] = summary

    def log(self, *args, **kwargs):
        pass

    def finish(self):
        pass


def test_wandb_summarises_validation_loss_by_its_best(tmp_path, monkeypatch):
    import wandb

    run = FakeRun()
    monkeypatch.setattr(wandb, "init", lambda **kw: run)
    cfg = load_config(["logger=wandb", "logger.mode=offline", "trainer.max_steps=1"]).logger
    build_logger(cfg, tmp_path, {}, is_main=True)
    assert run.metrics == {"val_loss": "min,last", "val_ppl": "min,last"}


def test_wandb_run_name_defaults_to_the_run_dir(tmp_path, monkeypatch):
    import wandb

    names = []
    monkeypatch.setattr(wandb, "init", lambda **kw: names.append(kw["name"]) or FakeRun())
    cfg = load_config(["logger=wandb", "logger.mode=offline", "trainer.max_steps=1"]).logger
    sweep_job = tmp_path / "multirun" / "2026-11-23" / "20-30-53-000001" / "1"
    for run_dir in (tmp_path / "runs" / "2026-11-23" / "20-30-53", tmp_path / "runs" / "gpt-42",
                    sweep_job):  # fmt: skip
        run_dir.mkdir(parents=True)
        build_logger(cfg, run_dir, {}, is_main=True)
    build_logger(replace(cfg, run_name="mine"), tmp_path / "runs" / "gpt-42", {}, is_main=True)
    assert names == ["2026-11-23/20-30-53", "gpt-42", "2026-11-23/20-30-53-000001/1", "mine"]


def test_wandb_run_group_comes_from_the_config(tmp_path, monkeypatch):
    import wandb

    groups = []
    monkeypatch.setattr(wandb, "init", lambda **kw: groups.append(kw["group"]) or FakeRun())
    overrides = ["logger=wandb", "logger.mode=offline", "trainer.max_steps=1", "logger.group=lr"]
    build_logger(load_config(overrides).logger, tmp_path, {}, is_main=True)
    build_logger(load_config(overrides[:-1]).logger, tmp_path, {}, is_main=True)
    assert groups == ["lr", None]


def test_wandb_unreachable_online_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    """A node without internet (or W&B down) trains and logs offline instead of crashing at
    wandb.init, which the sbatch scripts would requeue into the same failure."""
    import wandb

    calls, offline_run = [], FakeRun()

    def init(**kw):
        calls.append(kw["mode"])
        if kw["mode"] == "online":
            raise wandb.errors.CommError("Failed to get resume status: context deadline exceeded")
        return offline_run

    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setattr(wandb, "teardown", lambda: calls.append("teardown"))
    cfg = load_config(["logger=wandb", "logger.mode=online", "trainer.max_steps=1"]).logger
    logger = build_logger(cfg, tmp_path, {}, is_main=True)
    assert calls == ["online", "teardown", "offline"] and logger.run is offline_run
    err = capsys.readouterr().err
    assert "W&B online failed (Failed to get resume status" in err
    assert f"wandb sync {tmp_path}/wandb/offline-run-*" in err

    # Offline is the user's choice: a failure there is not hidden.
    monkeypatch.setattr(wandb, "init", lambda **kw: (_ for _ in ()).throw(wandb.errors.Error("x")))
    with pytest.raises(wandb.errors.Error):
        build_logger(
            load_config(["logger.mode=offline", "trainer.max_steps=1"]).logger, tmp_path, {}, True
        )


def test_wandb_logs_online_when_wandb_login_left_a_key(tmp_path, monkeypatch):
    """`wandb login` writes the key to ~/.netrc, not the environment; a user who ran it expects
    online logging without exporting WANDB_API_KEY."""
    import wandb

    modes = []
    monkeypatch.setattr(wandb, "init", lambda **kw: modes.append(kw["mode"]) or FakeRun())
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    netrc_file = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc_file))
    cfg = load_config(["logger=wandb", "trainer.max_steps=1"]).logger
    assert cfg.mode is None
    build_logger(cfg, tmp_path, {}, is_main=True)  # no netrc file: offline
    netrc_file.write_text("machine example.org login user password secret\n")
    build_logger(cfg, tmp_path, {}, is_main=True)  # another host's entry: offline
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    build_logger(cfg, tmp_path, {}, is_main=True)
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")  # a W&B server of one's own
    build_logger(cfg, tmp_path, {}, is_main=True)
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    build_logger(cfg, tmp_path, {}, is_main=True)
    assert modes == ["offline", "offline", "online", "offline", "online"]


def test_eta_leaves_the_first_interval_out_once_past_it():
    """A compiled run: 30 s of compilation in the first 10-step interval, then 1 s a step."""
    pace = Pace(start=0.0, start_step=0)
    assert pace.eta(10, 1000, now=40.0) == pytest.approx(4.0 * 990)  # all it knows yet
    assert pace.eta(20, 1000, now=50.0) == pytest.approx(1.0 * 980)  # since step 10
    assert pace.eta(30, 1000, now=70.0) == pytest.approx(1.5 * 970)  # still since step 10
    assert pace.eta(1000, 1000, now=1030.0) == 0.0
    resumed = Pace(start=0.0, start_step=500)  # a resume: steps count from its checkpoint
    assert resumed.eta(510, 1000, now=20.0) == pytest.approx(2.0 * 490)
