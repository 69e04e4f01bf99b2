"""``llmtrain-plot RUN_DIR``: one PNG of a run's curves from ``RUN_DIR/metrics.jsonl``.

The trainer writes one JSON object per line: train records (``step``, ``tokens``, ``loss``,
``ppl``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``mfu``, ...), eval records (``step``,
``tokens``, ``val_loss``, ``val_ppl``) and, with trainer.hellaswag_every, HellaSwag records
(``hellaswag_acc_norm``, ``hellaswag_acc``). Any key may be missing or null; a panel with nothing to
draw says so instead of failing.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


class PlotError(RuntimeError):
    """A run directory that cannot be plotted; the message says why and what to do."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PlotError(
            f"{path} not found: is this a run directory? The trainer writes "
            "metrics.jsonl there at the first log step."
        )
    records = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write leaves a torn last line; anything else is a broken file
            if n == len(lines):
                continue
            raise PlotError(f"{path}:{n}: not a JSON object: {line[:80]!r}") from None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    if not records:
        raise PlotError(
            f"{path} has no records with a 'step' yet; train at least "
            "trainer.log_every steps, then plot."
        )
    return records


def series(records: list[dict[str, Any]], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of the records where both are finite numbers."""
    xs, ys = [], []
    for r in records:
        a, b = r.get(x), r.get(key)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isfinite(b):
            xs.append(a)
            ys.append(b)
    return xs, ys


def _perplexity(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train ``ppl`` where logged, else exp(loss) (capped as metrics.perplexity caps it)."""
    out = []
    for r in records:
        if r.get("ppl") is None and isinstance(r.get("loss"), (int, float)) and r["loss"] < 50:
            r = {**r, "ppl": math.exp(r["loss"])}
        if (
            r.get("val_ppl") is None
            and isinstance(r.get("val_loss"), (int, float))
            and r["val_loss"] < 50
        ):
            r = {**r, "val_ppl": math.exp(r["val_loss"])}
        out.append(r)
    return out


def _draw(
    ax,
    records,
    keys: list[tuple[str, str, str]],
    x: str,
    title: str,
    ylabel: str,
    log: bool = False,
) -> None:
    drawn = False
    for key, label, style in keys:
        xs, ys = series(records, key, x)
        if not xs:
            continue
        marker = "o" if style == "val" else None
        ax.plot(
            xs,
            ys,
            label=label,
            marker=marker,
            markersize=3,
            linewidth=1.0 if style == "train" else 1.6,
        )
        drawn = True
    ax.set_title(title)
    ax.set_xlabel("tokens" if x == "tokens" else "step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if not drawn:
        ax.text(
            0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray"
        )
        return
    from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 2M, not 2 x 1e6
    values = [v for k, _, _ in keys for v in series(records, k, x)[1]]
    if log and min(values) > 0:
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 3, 4, 6 rather than 3 x 10^0
        ax.yaxis.set_major_formatter(plain)
        # under a decade the log axis has no major ticks inside; label the minor ones
        ax.yaxis.set_minor_formatter(plain if max(values) / min(values) < 5 else NullFormatter())
    if len(keys) > 1:
        ax.legend()


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write the figure and return its path (``RUN_DIR/plots.png`` by default)."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotError("llmtrain-plot needs matplotlib: pip install 'llmtrain[plot]'") from e
    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    if run_dir.name == "metrics.jsonl" and run_dir.is_file():  # the file itself was named
        run_dir = run_dir.parent
    records = _perplexity(read_metrics(run_dir / "metrics.jsonl"))
    loss = [("loss", "train", "train"), ("val_loss", "val", "val")]
    by_tokens = any(isinstance(r.get("tokens"), (int, float)) for r in records)
    panels = [
        (loss, "step", "Loss vs step", "cross-entropy (nats)", True),
        (loss, "tokens", "Loss vs tokens", "cross-entropy (nats)", True),
        (
            [("ppl", "train", "train"), ("val_ppl", "val", "val")],
            "step",
            "Perplexity",
            "perplexity",
            True,
        ),
        ([("lr", "lr", "train")], "step", "Learning rate", "lr", False),
        ([("tokens_per_s", "tokens/s", "train")], "step", "Throughput", "tokens / s", False),
        (
            [("grad_norm", "grad norm", "train")],
            "step",
            "Gradient norm (before clipping)",
            "global L2 norm",
            True,
        ),
    ]
    if not by_tokens:
        panels.pop(1)
    if any("hellaswag_acc" in r for r in records):  # trainer.hellaswag_every
        accuracy = [("hellaswag_acc_norm", "acc_norm", "val"), ("hellaswag_acc", "acc", "val")]
        panels.append((accuracy, "step", "HellaSwag", "accuracy (chance 0.25)", False))
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(12, 3.6 * rows), squeeze=False)
    for ax, (keys, x, title, ylabel, log) in zip(axes.flat, panels, strict=False):
        _draw(ax, records, keys, x, title, ylabel, log)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    last = max(r["step"] for r in records)
    fig.suptitle(f"{run_dir.resolve().name}: {len(records)} records, last step {last}")
    fig.tight_layout()
    out = out or run_dir / "plots.png"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as e:  # a read-only run dir, a --out under a file: say so, no traceback
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(out) else ""
        raise PlotError(
            f"cannot write {out}: {e.strerror or e}{where}; choose another path with --out"
        ) from None
    finally:
        plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llmtrain-plot", description="Plot loss, perplexity, lr and throughput of a run."
    )
    parser.add_argument("run_dir", type=Path, help="a run directory, or its metrics.jsonl")
    parser.add_argument(
        "--out", type=Path, default=None, help="PNG path (default: RUN_DIR/plots.png)"
    )
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run_dir, args.out)
    except PlotError as e:
        print(f"llmtrain-plot: {e}", file=sys.stderr)
        return 2  # a bad input, as for every llmtrain tool
    print(path)
    return 0
