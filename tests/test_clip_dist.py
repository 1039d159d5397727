"""EVA-CLIP's gathered loss on 2 gloo ranks equals the 1-process loss on the concatenated batch.

Two worker processes (tests/clip_dist_worker.py) run `ClipObjective` on a DDP-wrapped tiny CLIP,
each on its half of one global batch, in four scenarios: one pass, cached-feature micro-batches,
and both again with one rank short of a pair (padding + masking). The mean of the ranks' losses
and the DDP-averaged gradients must equal the loss and gradients of one process on all valid pairs.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clip_dist_worker import SCENARIOS, global_batch, run_objective, tiny_clip

pytestmark = [pytest.mark.dist]

TOLERANCE = 1e-5  # fp32, different reduction order
WORKER_TIMEOUT_S = 90  # a hung collective fails the test instead of blocking it
WORKER = Path(__file__).with_name("clip_dist_worker.py")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(workdir: Path, world_size: int = 2) -> list[tuple[subprocess.Popen, Path]]:
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
            OMP_NUM_THREADS="1",
        )
        log_path = workdir / f"rank{rank}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, str(WORKER), str(workdir)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        ranks.append((process, log_path))
    return ranks


def wait(ranks: list[tuple[subprocess.Popen, Path]], deadline: float) -> str:
    failures = []
    for process, log_path in ranks:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            failures.append(f"{log_path.name} still running after {WORKER_TIMEOUT_S} s; killed")
            for other, _ in ranks:
                other.kill()
                other.wait()
        if process.returncode != 0:
            error = log_path.with_name(log_path.name.replace("rank", "error-rank").replace(".log", ".txt"))
            detail = error.read_text() if error.exists() else log_path.read_text()[-3000:]
            failures.append(f"{log_path.name} (exit {process.returncode}):\n{detail}")
    return "\n".join(failures)


@pytest.fixture(scope="module")
def ranks_and_references(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clip_dist")
    ranks = launch(workdir)
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    batch = global_batch()
    references = {}
    try:  # the 1-process references run while the workers do
        with pytest.MonkeyPatch.context() as patch:
            for var in TORCHRUN_VARS:
                patch.delenv(var, raising=False)
            for name, (_, rows0, rows1) in SCENARIOS.items():
                rows = [*rows0, *rows1]
                valid = {"images": batch["images"][rows], "texts": [batch["texts"][i] for i in rows]}
                references[name] = run_objective(tiny_clip(), valid, micro_batch_size=0)
    finally:
        failures = wait(ranks, deadline)
    assert not failures, failures
    results = [torch.load(workdir / f"result-rank{r}.pt", weights_only=True) for r in range(2)]
    return results, references


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_match_one_process_on_the_global_batch(ranks_and_references, scenario):
    results, references = ranks_and_references
    reference_loss, reference_grads = references[scenario]
    for rank in range(2):
        got = results[rank][scenario]
        assert got["loss"] == pytest.approx(reference_loss, abs=TOLERANCE)
        assert set(got["grads"]) == set(reference_grads)
        for name, grad in reference_grads.items():
            torch.testing.assert_close(got["grads"][name], grad, atol=TOLERANCE, rtol=1e-4, msg=name)
