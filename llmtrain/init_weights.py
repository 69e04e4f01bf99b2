"""trainer.init_from: a checkpoint's (or a transformers model's) weights into the freshly built
model, before ``accelerator.prepare()`` shards it, so every dist mode starts from full weights
on each rank and any checkpoint layout serves any other.

Rank 0 reads the weights (checked against the checkpoint's manifest and config) into its model;
the other ranks' models are empty, and ``accelerator.prepare()`` broadcasts rank 0's weights to
them as it does a fresh model's (run.py). Only rank 0 holds a full fp32 copy beside its model:
when each rank read its own, an 8-GPU node held eight (a 1B model: 32 GB of host memory more),
and reading ZeRO shards briefly took their optimizer moments eight times over too. The
checkpoint chosen in a run dir (its newest intact one) is rank 0's for every rank.
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import torch

from llmtrain import resume
from llmtrain.config import TrainConfig
from llmtrain.hf import is_hf_source, read_hf_weights
from llmtrain.integrity import broadcast
from llmtrain.model import GPT


def load_weights(model: GPT, cfg: TrainConfig, source: Path) -> Path:
    """Load trainer.init_from (found at ``source``) into rank 0's ``model``; returns the
    checkpoint read, on every rank. The other ranks' models are empty: prepare() broadcasts
    rank 0's weights to them (run.py)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _read_into(model, cfg, source)
    # Rank 0 may read for many minutes (an 8B model's ZeRO shards): the others poll the store
    # for its outcome rather than wait in a collective, which dist.timeout_s would end.
    # (Should rank 0 die, the launcher stops them.)
    store = dist.distributed_c10d._get_default_store()
    key = f"llmtrain/init_from/{broadcast(os.urandom(8).hex())}"
    if dist.get_rank() == 0:
        try:
            found: Path | BaseException = _read_into(model, cfg, source)
        except Exception as e:  # noqa: BLE001 -- every rank raises it, below
            found = e
        store.set(key, pickle.dumps(_portable(found) if isinstance(found, Exception) else found))
    else:
        while not store.check([key]):
            time.sleep(0.5)
        found = pickle.loads(store.get(key))
    dist.barrier()  # every rank has the outcome before any goes on (the store may be rank 0)
    if isinstance(found, BaseException):
        raise found
    return found


def _read_into(model: GPT, cfg: TrainConfig, source: Path) -> Path:
    from llmtrain.export import load_checkpoint  # names and shapes checked against config.yaml

    if is_hf_source(cfg.trainer.init_from):  # a transformers model, checked by init_source
        model.load_state_dict(read_hf_weights(source, cfg.model))
        return source
    # Hashed as read: a newest checkpoint damaged past its sizes gives way to an older one,
    # whose model is then checked too.
    state, saved, source = load_checkpoint(cfg.trainer.init_from)
    resume.check_init_model(saved, cfg, source)
    model.load_state_dict(state)  # a tied head is under both names, one tensor
    return source


def _portable(e: BaseException) -> BaseException:
    """``e`` as the other ranks can unpickle it: its own class where that round-trips (the
    CLI's exit code depends on it), else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 -- an exception whose __init__ takes other arguments
        return RuntimeError(f"{type(e).__name__}: {e}")
