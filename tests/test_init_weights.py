"""trainer.init_from across processes (llmtrain/init_weights.py): rank 0 reads the weights and
every rank learns which; a checkpoint rank 0 cannot use stops every rank with its error. A whole
run from init_from in every layout and dist mode: test_init_from.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_init_from import FAST

from llmtrain.config import load_config
from llmtrain.train import train


def _load_in_rank(src: str, slow: float = 0.0) -> dict:
    """In each forked rank: a model of its own random init, then trainer.init_from=src; rank 0
    reads for ``slow`` seconds more than a collective may wait (2 s here)."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    import llmtrain.export as export
    from llmtrain.init_weights import load_weights
    from llmtrain.run import build_model

    dist.init_process_group("gloo", timeout=timedelta(seconds=2))
    reads, read = [], export.load_checkpoint
    export.load_checkpoint = lambda path: reads.append(time.sleep(slow)) or read(path)
    cfg = load_config([*FAST, f"trainer.init_from={src}"])
    torch.manual_seed(100 + dist.get_rank())  # the ranks' own weights differ
    model = build_model(cfg)
    try:
        found = load_weights(model, cfg, Path(src))
    except Exception as e:  # noqa: BLE001 -- what each rank raised is the result
        return {"error": f"{type(e).__name__}: {e}", "reads": len(reads)}
    finally:
        dist.destroy_process_group()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"found": found, "reads": len(reads), "state": state}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("init") / "run"
    train(load_config([*FAST, "trainer.max_steps=1"]), src)
    return src


@pytest.mark.distributed
def test_rank_0_reads_the_weights_and_every_rank_learns_which(source, tmp_path):
    """Each rank read the whole checkpoint itself: eight full fp32 copies on an 8-GPU node.
    The others wait for rank 0's read however long it takes (an 8B model's ZeRO shards: many
    minutes), not in a collective that dist.timeout_s ends. Their models are left alone:
    prepare() broadcasts rank 0's (a whole run: test_init_from.py)."""
    from dist_worker import run

    from llmtrain.sample import load_gpt

    results = run(_load_in_rank, 2, str(source), 4.0, tmp=tmp_path)
    assert [r["reads"] for r in results] == [1, 0]
    saved = source / "checkpoints" / "step_0000001"
    assert [r["found"] for r in results] == [saved, saved]
    expected = load_gpt(saved)[0].state_dict()
    assert results[0]["state"].keys() == expected.keys()
    assert all(torch.equal(results[0]["state"][k], v) for k, v in expected.items())
    assert not torch.equal(results[1]["state"]["lm_head.weight"], expected["lm_head.weight"])


@pytest.mark.distributed
def test_a_checkpoint_rank_0_cannot_use_stops_every_rank_with_its_error(source, tmp_path):
    ckpt = tmp_path / "step_0000001"
    shutil.copytree(source / "checkpoints" / "step_0000001", ckpt)
    weights = bytearray((ckpt / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit: the manifest's hash no longer matches
    (ckpt / "model.safetensors").write_bytes(bytes(weights))

    from dist_worker import run

    results = run(_load_in_rank, 2, str(ckpt), tmp=tmp_path)
    assert [r["reads"] for r in results] == [1, 0]
    errors = [r["error"] for r in results]
    assert errors[0] == errors[1] and errors[0].startswith("CheckpointError: "), errors
    assert "model.safetensors" in errors[0]


def _hub_model_in_rank(weights_dir: str, configs_dir: str) -> dict:
    """In each forked rank: trainer.init_from=hf:REPO, with huggingface_hub's download answered
    from ``weights_dir`` (config and weights) or ``configs_dir`` (the JSON files only)."""
    from datetime import timedelta

    import huggingface_hub
    import torch.distributed as dist

    from llmtrain.init_weights import load_weights
    from llmtrain.resume import init_source
    from llmtrain.run import build_model

    asked = []

    def download(repo: str, allow_patterns: list[str], **kwargs) -> str:
        asked.append(allow_patterns)
        return weights_dir if "*.safetensors" in allow_patterns else configs_dir

    huggingface_hub.snapshot_download = download
    dist.init_process_group("gloo", timeout=timedelta(seconds=20))
    try:
        cfg = load_config([*FAST, "trainer.init_from=hf:someone/tiny-gpt"])
        torch.manual_seed(100 + dist.get_rank())
        model = build_model(cfg)
        load_weights(model, cfg, init_source(cfg, resumed=False))
    finally:
        dist.destroy_process_group()
    return {"asked": asked, "state": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.mark.distributed
def test_only_rank_0_downloads_a_hub_model_s_weights(source, tmp_path):
    """hf:REPO: every rank downloaded the safetensors (llama-8b: 16 GB per rank's cache, eight
    or more at once on a node) that only rank 0 reads."""
    from dist_worker import run

    from llmtrain.export import export
    from llmtrain.hf import read_hf_weights

    export(source / "checkpoints" / "step_0000001", tmp_path / "hub")
    configs = tmp_path / "configs-only"
    configs.mkdir()
    for f in (tmp_path / "hub").glob("*.json"):
        shutil.copy(f, configs / f.name)
    results = run(_hub_model_in_rank, 2, str(tmp_path / "hub"), str(configs), tmp=tmp_path)
    assert [r["asked"] for r in results] == [[["*.json", "*.safetensors"]], [["*.json"]]]
    expected = read_hf_weights(tmp_path / "hub", load_config(FAST).model)
    assert all(torch.equal(results[0]["state"][k], v) for k, v in expected.items())
