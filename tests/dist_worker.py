"""Fast multi-process runs for tests: fork ranks from this already-imported process.

``torchrun`` costs 6-10 s per launch (a fresh interpreter importing torch, DeepSpeed and
Accelerate); forking costs ~1 s. Each worker gets torchrun's environment variables, runs
``fn(*args)``, and sends back its return value. Workers end with a barrier and ``os._exit``:
torch 2.13's gloo teardown can abort a finished process otherwise (pytorch issue 190489).
"""

from __future__ import annotations

import faulthandler
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Imported before forking so no worker pays for it.
import accelerate  # noqa: F401
import deepspeed  # noqa: F401
import torch.multiprocessing as mp
import transformers  # noqa: F401  (Accelerate's DeepSpeed path needs it importable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reset_singletons() -> None:
    """Forked from a process that may have run single-process training: forget its state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    PartialState._reset_state()
    GradientState._reset_state()


def _worker(
    rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple, env: dict[str, str]
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(world),
            "GROUP_RANK": "0",
            "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
    )
    import torch

    # A hung rank prints every thread's stack when the parent gives up on it (see run).
    faulthandler.register(signal.SIGQUIT, all_threads=True)
    torch.set_num_threads(1)
    _reset_singletons()
    code = 0
    try:
        result: Any = fn(*args)
        payload = ("ok", result)
    except BaseException as e:  # noqa: BLE001 -- reported to the parent
        payload = ("error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
        code = 1
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(payload))
    try:
        import torch.distributed as dist

        if code == 0 and dist.is_initialized():
            dist.barrier()
    except Exception:  # noqa: BLE001
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _native_stacks(pid: int) -> str:
    """Every thread's native stack in process ``pid``, where gdb is installed: a hang inside
    torch (a C++ destructor waiting on a thread that waits for the GIL) has no Python frame."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(no gdb for native stacks)"
    try:
        out = subprocess.run(
            [gdb, "-p", str(pid), "-batch", "-ex", "thread apply all bt"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(gdb: {e})"
    return "\n".join(line for line in out.splitlines() if line.startswith(("Thread ", "#")))


def run(
    fn: Callable,
    world: int,
    *args: Any,
    tmp: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180,
) -> list[Any]:
    """``fn(*args)`` on ``world`` forked ranks; returns each rank's result, rank order."""
    out = Path(tmp) / f"results-{free_port()}"
    out.mkdir(parents=True)
    ctx = mp.start_processes(
        _worker,
        args=(world, free_port(), str(out), fn, args, env or {}),
        nprocs=world,
        join=False,
        start_method="fork",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:  # a hung rank: end them all, or they outlive the test
                stuck = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                for r in stuck:  # where it hangs: native stacks here, Python's on its stderr
                    print(f"rank {r}:\n{_native_stacks(ctx.processes[r].pid)}", file=sys.stderr)
                    os.kill(ctx.processes[r].pid, signal.SIGQUIT)
                time.sleep(1)
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"ranks {stuck} still running after {timeout:.0f} s")
    except mp.ProcessRaisedException:
        pass
    except mp.ProcessExitedException as e:
        errors = [
            pickle.loads(p.read_bytes())[1]
            for p in sorted(out.glob("rank*.pkl"))
            if pickle.loads(p.read_bytes())[0] == "error"
        ]
        raise RuntimeError("\n".join(errors) or str(e)) from None
    results = [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]
    errors = [value for status, value in results if status == "error"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [value for _, value in results]
