"""What a run reports: FLOPs and MFU, the metrics.jsonl file, the console line, W&B."""

from __future__ import annotations

import contextlib
import json
import math
import netrc
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from llmtrain.config import DATED_DIR, LoggerConfig, ModelConfig
from llmtrain.integrity import write_atomic
from llmtrain.model import padded_vocab

# Dense bf16 tensor-core peak, TFLOP/s, from each vendor datasheet (no sparsity). A key matches
# when each of its words is a whole word of torch.cuda.get_device_name() ("L4" is not "L40");
# tried in order, so more specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM (e.g. "NVIDIA H200")
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H800 PCIe", 756.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),  # SXM4 and PCIe alike
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def device_peak_tflops(device_name: str | None) -> float | None:
    """The bf16 peak for a device name, or None when the device is not in the table. A MIG
    slice ("NVIDIA H100 80GB HBM3 MIG 1g.10gb") has a fraction of the GPU's peak: None too."""
    if not device_name:
        return None
    words = set(re.split(r"[^0-9a-z]+", device_name.lower()))  # "A100-SXM4-80GB" -> a100, ...
    if "mig" in words:
        return None
    for key, tflops in PEAK_BF16_TFLOPS:
        if set(key.lower().split()) <= words:
            return tflops
    return None


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token: the blocks and the output head.

    The token and position embeddings are lookups, not matmuls, so they cost no FLOPs; the
    output head (tied or not) is a (n_embd x vocab) matmul and does.
    """
    d, kv_heads = cfg.n_embd, cfg.n_kv_head or cfg.n_head
    head_dim = d // cfg.n_head
    ffn = cfg.ffn_hidden or 4 * d
    attn = d * d + 2 * d * kv_heads * head_dim + d * d  # q, k, v, out
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * ffn
    return cfg.n_layer * (attn + mlp) + d * padded_vocab(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 12 * n_layer * n_embd * seq_len.

    6N: forward (2N) plus backward (4N) multiply-adds of the matmul parameters N. The second
    term is attention's QK^T and AV, counted for the full T x T score matrix as in the PaLM
    paper (Chowdhery et al. 2022, appendix B), so figures compare with PaLM's and nanoGPT's
    MFU. llm.c counts 6 * n_layer * n_embd * seq_len (the causal half) and every parameter:
    its MFU for the same tokens/s reads lower, by ~6% for gpt2-small at seq 1024 and for
    llama-1b at seq 2048; compare tokens/s with it, or scale.
    """
    return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layer * cfg.n_embd * seq_len


def mfu(tokens_per_s: float, flops_token: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device peak (None if unknown)."""
    if not peak_tflops:
        return None
    return tokens_per_s * flops_token / (peak_tflops * 1e12)


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far, in GiB: allocated tensors on a GPU, resident memory on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # The process's peak resident memory: VmHWM (which llmtrain-bench resets between runs)
    # where Linux has it, else ru_maxrss (KiB on Linux).
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def git_sha() -> str:
    """HEAD's commit, with "-dirty" when ``llmtrain/`` or ``conf/`` differ from it (a run of
    edited code says so in its receipt); "unknown" outside a git checkout."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=5, check=True
        )
        return out.stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        edited = git("status", "--porcelain", "--untracked-files=no", "--", "llmtrain", "conf")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if edited else "")


def source_sha() -> str:
    """A hash of llmtrain/*.py and conf/**/*.yaml as they are: names the code a record ran, also
    where there is no git (a copy of the tree on a lent GPU host)."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    files = sorted([*root.glob("llmtrain/*.py"), *root.glob("conf/**/*.yaml")])
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def package_version(name: str) -> str | None:
    """An installed package's version; None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def receipt() -> dict[str, str]:
    """What produced a run: saved beside every checkpoint and sent to the logger."""
    pkg = package_version("llmtrain") or "unknown"
    return {"llmtrain": pkg, "git_sha": git_sha(), "torch": torch.__version__}


class NullLogger:
    """logger=none: the tracker that does nothing."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_credentials() -> str | None:
    """Where W&B would find a key to log in with, or None: $WANDB_API_KEY, an identity token
    file, or the netrc entry for its host that ``wandb login`` writes ($NETRC, else ~/.netrc
    or ~/_netrc; the host from $WANDB_BASE_URL, else api.wandb.ai)."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(var):
            return f"${var}"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    names = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for name in names:
        try:
            if netrc.netrc(Path(name).expanduser()).authenticators(host):
                return name
        except (OSError, netrc.NetrcParseError):
            continue
    return None


class WandbLogger:
    """Weights & Biases; offline (files under the run dir) when there is no key to log in with
    (neither $WANDB_API_KEY nor ``wandb login``'s netrc entry).

    The W&B run id is kept in the run dir (``wandb_run_id``), so a resumed training run goes on
    logging to the same W&B run: one curve, not one run per restart. W&B keeps steps increasing,
    so steps an interrupted attempt logged after its last checkpoint keep their first values
    (metrics.jsonl keeps the resumed run's). Offline, each attempt writes its own
    ``wandb/offline-run-*`` dir under the same id, and ``wandb sync`` of them all uploads one
    run, in order.
    """

    ID_FILE = "wandb_run_id"

    def __init__(
        self, cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], resume: bool = False
    ):
        import wandb

        # logger.mode, else WANDB_MODE, else online only when there is a key to log in with.
        mode = (
            cfg.mode
            or os.environ.get("WANDB_MODE")
            or ("online" if wandb_credentials() else "offline")
        )
        init = dict(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.run_name or self.default_name(run_dir),
            id=self.run_id(run_dir, resume),
            resume="allow",
            allow_val_change=resume,  # a resume may change the horizon, the logger's mode...
            dir=str(run_dir),
            config=config,
            tags=list(cfg.tags),
            group=cfg.group,
        )
        try:
            self.run = wandb.init(**init, mode=mode)
        except wandb.errors.Error as e:
            if mode != "online":
                raise
            # A compute node without internet, a server down, a revoked key: the run trains
            # and logs offline rather than crash (and be requeued into the same failure).
            reason = str(e).strip().splitlines()[0]
            print(
                f"llmtrain: W&B online failed ({reason}); logging offline under {run_dir}/wandb "
                f"instead. Upload it later with: wandb sync {run_dir}/wandb/offline-run-*",
                file=sys.stderr,
                flush=True,
            )
            wandb.teardown()  # the failed run still holds its id in W&B's service process
            self.run = wandb.init(**init, mode="offline")
        # The runs table and a sweep's comparison show the best validation loss, not the last
        # (which, past the best, is overfitting or a late spike).
        for key in ("val_loss", "val_ppl"):
            self.run.define_metric(key, summary="min,last")

    @staticmethod
    def default_name(run_dir: Path) -> str:
        """The run dir's name; under Hydra's dated dirs, from the date on: runs/<date>/<time>
        gives "<date>/<time>", a sweep's multirun/<date>/<time>/<job> "<date>/<time>/<job>"
        (the time or the job number alone would not say which run)."""
        parts = run_dir.parts
        dated = [i for i, p in enumerate(parts) if re.fullmatch(DATED_DIR, p)]
        return "/".join(parts[dated[-1] :]) if dated else run_dir.name

    @classmethod
    def run_id(cls, run_dir: Path, resume: bool) -> str:
        """The run dir's W&B id when resuming; a new one, written down, for a fresh run."""
        path = run_dir / cls.ID_FILE
        if resume and path.is_file() and (saved := path.read_text().strip()):
            return saved
        run_id = secrets.token_hex(6)  # lowercase letters and digits, as W&B ids are
        write_atomic(path, run_id + "\n")
        return run_id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if v is not None}, step=step)

    def finish(self) -> None:
        self.run.finish()


def build_logger(
    cfg: LoggerConfig, run_dir: Path, config: dict[str, Any], is_main: bool, resume: bool = False
):
    """Only the main process talks to a tracker; every other rank gets the no-op."""
    if not is_main or cfg.name == "none":
        return NullLogger()
    return WandbLogger(cfg, run_dir, config, resume)


@dataclass
class Throughput:
    """Tokens/s and data-wait fraction over the current log interval."""

    start: float = field(default_factory=time.perf_counter)
    tokens: int = 0
    data_wait: float = 0.0

    def reset(self) -> None:
        self.start, self.tokens, self.data_wait = time.perf_counter(), 0, 0.0

    def read(self) -> tuple[float, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.tokens / elapsed, self.data_wait / elapsed


@dataclass
class Pace:
    """The ETA's pace: seconds per step since the first log record, evaluations and saves
    included. The first interval holds the loop's warm-up (a streaming loader's start,
    torch.compile's compilation: half a minute to minutes); spread over the whole horizon it
    made the first ETAs several times too long (gpt2-small compiled: ~22 h at step 10 for a
    6 h run, still +26% at step 100). Until that first record, the pace is since ``start``."""

    start: float = field(default_factory=time.perf_counter)
    start_step: int = 0
    mark: tuple[float, int] | None = None  # (time, step) of the first log record

    def eta(self, step: int, max_steps: int, now: float | None = None) -> float:
        now = time.perf_counter() if now is None else now
        t0, s0 = self.mark if self.mark and step > self.mark[1] else (self.start, self.start_step)
        if self.mark is None:
            self.mark = (now, step)
        return (now - t0) / max(1, step - s0) * max(0, max_steps - step)


class MetricsFile:
    """metrics.jsonl: one JSON object per record, flushed as written (main process only).

    A fresh run (``resumed_at=None``) starts the file anew. A run resumed at step S keeps the
    records up to S and drops later ones, left by the attempt that was cut off after its last
    checkpoint: the resumed run logs those steps again, and each step appears once.
    ``logged_past`` is the last step of the records it dropped (None when it dropped none).
    """

    def __init__(self, path: Path | None, resumed_at: int | None = None):
        self.file = None
        self.logged_past: int | None = None
        if path is None:
            return
        kept = []
        if resumed_at is not None and path.exists():
            lines = path.read_text("utf-8").splitlines()
            steps = [_step(x) for x in lines]  # None: a torn line, dropped too
            kept = [
                x for x, s in zip(lines, steps, strict=True) if s is not None and s <= resumed_at
            ]
            later = [s for s in steps if s is not None and s > resumed_at]
            self.logged_past = max(later, default=None)
        write_atomic(path, "".join(x + "\n" for x in kept))
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        if self.file:
            # inf and NaN are not JSON (json.dumps writes Infinity, which strict readers refuse)
            record = {k: None if _nonfinite(v) else v for k, v in record.items()}
            self.file.write(json.dumps(record, allow_nan=False) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


def _step(line: str) -> int | None:
    """A whole record's step; None for a torn line."""
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return None


def _nonfinite(v: Any) -> bool:
    return isinstance(v, float) and not math.isfinite(v)


def perplexity(loss: float) -> float:
    """exp(loss); inf past float64's range (a loss above ~709.78)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def fixed_or_sci(x: float, fixed: str, lo: float, hi: float) -> str:
    """``x`` in the ``fixed`` format (e.g. ``.4f``) for lo <= |x| < hi (and 0), else as
    ``.3e``: a grad norm of 4e-4 printed as 0.000 read like the all-zero gradient that stops
    a run, and a ppl of 3.5e19 took twenty digits."""
    if x == 0 or (math.isfinite(x) and lo <= abs(x) < hi):
        return format(x, fixed)
    return format(x, ".3e")


def format_loss(loss: float) -> str:
    return fixed_or_sci(loss, ".4f", 1e-3, 1e4)


def format_ppl(ppl: float) -> str:
    return fixed_or_sci(ppl, "9.2f", 1.0, 1e6).rjust(9)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def console_line(r: dict[str, Any], max_steps: int, eta_s: float) -> str:
    mfu_s = f"{100 * r['mfu']:4.1f}%" if r.get("mfu") is not None else "  n/a"
    tok_s = r["tokens_per_s"]
    speed = f"{tok_s / 1e3:8.1f}k" if tok_s >= 1e3 else f"{tok_s:8.1f} "
    return (
        f"step {r['step']:>6}/{max_steps} | loss {format_loss(r['loss'])} "
        f"| ppl {format_ppl(r['ppl'])} | lr {r['lr']:.2e} "
        f"| grad {fixed_or_sci(r['grad_norm'], '.3f', 1e-2, 1e5)} | {speed} tok/s "
        f"| mfu {mfu_s} | mem {r['peak_mem_gb']:5.2f} GiB | wait {100 * r['data_wait']:4.1f}% "
        f"| eta {format_eta(eta_s)}"
    )
