"""Launch a worker script as torchrun-style gloo ranks on this machine (shared by the dist tests)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_ranks(worker: Path, workdir: Path, world_size: int = 2) -> list[tuple[subprocess.Popen, Path]]:
    """`python worker workdir` once per rank, with torchrun's environment; logs in workdir/rank<r>.log."""
    port = free_port()
    ranks = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
        env.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",  # two ranks on two cores: more threads would oversubscribe
        )
        log_path = workdir / f"rank{rank}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(worker), str(workdir)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        ranks.append((process, log_path))
    return ranks


def wait_ranks(ranks: list[tuple[subprocess.Popen, Path]], deadline: float) -> str:
    """Wait for every rank until `deadline` (time.monotonic), then kill all; returns failed ranks' logs.

    A worker may leave its traceback in error-rank<r>.txt beside its log; that is shown instead.
    """
    failures = []
    for process, log_path in ranks:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failures.append(f"{log_path.name} still running at the deadline; killed")
            for other, _ in ranks:
                other.kill()
                other.wait()
        if process.returncode != 0:
            error = log_path.with_name(log_path.name.replace("rank", "error-rank").replace(".log", ".txt"))
            detail = error.read_text() if error.exists() else log_path.read_text()[-3000:]
            failures.append(f"{log_path.name} (exit {process.returncode}):\n{detail}")
    return "\n".join(failures)
