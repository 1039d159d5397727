"""EVA-CLIP's gathered loss on 2 gloo ranks equals the 1-process loss on the concatenated batch.

Two worker processes (tests/clip_dist_worker.py) run `ClipObjective` on a DDP-wrapped tiny CLIP,
each on its half of one global batch, in four scenarios: one pass, cached-feature micro-batches,
and both again with one rank short of a pair (padding + masking). The mean of the ranks' losses
and the DDP-averaged gradients must equal the loss and gradients of one process on all valid pairs.
"""

import time
from pathlib import Path

import pytest
import torch
from clip_dist_worker import SCENARIOS, global_batch, run_objective, tiny_clip
from gloo_ranks import TORCHRUN_VARS, launch_ranks, wait_ranks

pytestmark = [pytest.mark.dist]

TOLERANCE = 1e-5  # fp32, different reduction order
WORKER_TIMEOUT_S = 90  # a hung collective fails the test instead of blocking it
WORKER = Path(__file__).with_name("clip_dist_worker.py")


@pytest.fixture(scope="module")
def ranks_and_references(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clip_dist")
    ranks = launch_ranks(WORKER, workdir)
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
        failures = wait_ranks(ranks, deadline)
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
