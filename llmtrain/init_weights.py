"""trainer.init_from: a checkpoint's (or a transformers model's) weights into the freshly built
model, before ``accelerator.prepare()`` shards it, so every dist mode starts from full weights
on each rank and any checkpoint layout serves any other.

Rank 0 reads the weights (checked against the checkpoint's manifest and config) and broadcasts
them tensor by tensor into every rank's model. Only rank 0 holds a full fp32 copy beside its
model: when each rank read its own, an 8-GPU node held eight (a 1B model: 32 GB of host memory
more), and reading ZeRO shards briefly took their optimizer moments eight times over too. The
checkpoint chosen in a run dir (its newest intact one) is rank 0's for every rank. Under FSDP2
the other ranks' models are empty and nothing is broadcast here: prepare() shares rank 0's
weights out into every rank's shards.
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


def load_weights(
    model: GPT, cfg: TrainConfig, source: Path, device: torch.device, every_rank: bool = True
) -> Path:
    """Load trainer.init_from (found at ``source``) into ``model`` on every rank (or on rank 0
    only: FSDP2's prepare() shares them out); returns the checkpoint read. ``device`` is the one
    the process group's collectives run on."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return _read_into(model, cfg, source)
    main = dist.get_rank() == 0
    # Rank 0 may read for many minutes (an 8B model's ZeRO shards): the others poll the store
    # for its outcome rather than wait in a collective, which dist.timeout_s would end.
    # (Should rank 0 die, the launcher stops them.)
    store = dist.distributed_c10d._get_default_store()
    key = f"llmtrain/init_from/{broadcast(os.urandom(8).hex())}"
    if main:
        try:
            found = _read_into(model, cfg, source)
        except Exception as e:
            store.set(key, pickle.dumps(_portable(e)))
            dist.barrier()  # every rank has it: the store goes with this process
            raise
        store.set(key, pickle.dumps(found))
    else:
        while not store.check([key]):
            time.sleep(0.5)
        found = pickle.loads(store.get(key))
        if isinstance(found, BaseException):
            dist.barrier()
            raise found
    if not every_rank:
        return found
    seen: set[int] = set()
    for tensor in model.state_dict().values():
        if tensor.data_ptr() in seen:  # a tied head: one tensor under two names
            continue
        seen.add(tensor.data_ptr())
        buffer = tensor.to(device)  # the tensor itself on a CPU (gloo) run
        dist.broadcast(buffer, src=0)
        if not main and buffer is not tensor:
            tensor.copy_(buffer)
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
