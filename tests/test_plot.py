"""llmtrain-plot on a synthetic metrics.jsonl in the trainer's format."""

import json
import math

import pytest

pytest.importorskip("matplotlib")

from llmtrain.plot import PlotError, main, read_metrics  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, steps=200, every=10, eval_every=50, tokens=True):
    lines = []
    for step in range(every, steps + 1, every):
        loss = 3.0 + 7.0 * math.exp(-step / 40)
        r = {
            "step": step,
            "loss": loss,
            "ppl": math.exp(loss),
            "lr": 6e-4 * min(1, step / 50),
            "grad_norm": 1.0 / math.sqrt(step),
            "tokens_per_s": 9000.0 + step,
            "mfu": None,
            "peak_mem_gb": 1.2,
            "data_wait": 0.01,
        }
        if tokens:
            r["tokens"] = step * 4096
        lines.append(json.dumps(r))
        if step % eval_every == 0:
            v = {"step": step, "val_loss": loss + 0.1, "val_ppl": math.exp(loss + 0.1)}
            if tokens:
                v["tokens"] = step * 4096
            lines.append(json.dumps(v))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)


def test_plot_writes_png(tmp_path, capsys):
    write_metrics(tmp_path)
    assert main([str(tmp_path)]) == 0
    out = tmp_path / "plots.png"
    assert_png(out)
    assert capsys.readouterr().out.strip() == str(out)
    out.unlink()
    assert main([str(tmp_path / "metrics.jsonl")]) == 0  # the file itself, named
    assert_png(out)


def test_plot_missing_keys_and_out_flag(tmp_path):
    # no tokens, no ppl (computed from loss), no throughput, a torn last line
    lines = [json.dumps({"step": s, "loss": 5.0 - s / 100}) for s in range(1, 50)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 50, "lo')
    out = tmp_path / "sub" / "curves.png"
    assert main([str(tmp_path), "--out", str(out)]) == 0
    assert_png(out)
    assert not (tmp_path / "plots.png").exists()


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl not found" in err and "run directory" in err


def test_empty_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    assert main([str(tmp_path)]) == 2
    assert "no records" in capsys.readouterr().err
    assert not (tmp_path / "plots.png").exists()


def test_broken_line_names_the_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n{"step": 2}\n')
    with pytest.raises(PlotError, match="metrics.jsonl:2"):
        read_metrics(tmp_path / "metrics.jsonl")


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    write_metrics(tmp_path)
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "plots.png"  # its parent is a file: cannot be made
    assert main([str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {out}" in err and "--out" in err


def test_a_hellaswag_panel_where_the_run_logged_it(tmp_path, monkeypatch):
    import llmtrain.plot as plot

    titles = []
    draw = plot._draw
    monkeypatch.setattr(plot, "_draw", lambda ax, r, k, x, title, *a: titles.append(title)
                        or draw(ax, r, k, x, title, *a))  # fmt: skip
    write_metrics(tmp_path)
    assert main([str(tmp_path)]) == 0 and "HellaSwag" not in titles
    with open(tmp_path / "metrics.jsonl", "a") as f:
        for step in (0, 100, 200):
            f.write(json.dumps({"step": step, "hellaswag_acc_norm": 0.25 + step / 2000,
                                "hellaswag_acc": 0.25}) + "\n")  # fmt: skip
    titles.clear()
    assert main([str(tmp_path)]) == 0 and titles[-1] == "HellaSwag"
