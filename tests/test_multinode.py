"""`flyeva pretrain` under real torchrun launches: two "nodes" on this machine equal one node of two.

The two-node launch is the documented multi-node command (docs/distributed.md) with both nodes on
127.0.0.1: each node has LOCAL_RANK 0 and one process, so anything that used the local rank where
the global rank belongs (data sharding, which rank writes) would train on duplicated data or
clobber files, and its weights would differ from the single-node run's.
"""

import os
import subprocess
import sys

import pytest
from gloo_ranks import TORCHRUN_VARS, free_port
from safetensors.torch import load_file
from test_pretrain import SMALL

pytestmark = [pytest.mark.dist, pytest.mark.slow]

LAUNCH_TIMEOUT_S = 240
OVERRIDES = [
    *SMALL,  # a miniature student and a random stand-in teacher, 8 images per rank and step
    "teacher.path=''",  # `flyeva pretrain` starts from the miniature recipe: not its trained teacher
    "teacher.train_recipe=''",
    "data.sources=[{type: shapeworld, num_samples: 64, image_size: 32, seed: 0}]",  # 4 steps
    "data.val=[]",
]


def torchrun(args: list[str], output_dir, log_path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *args,
        "-m",
        "flyeva.cli",
        "pretrain",
        *OVERRIDES,
        f"train.output_dir={output_dir}",
    ]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(processes: list[subprocess.Popen], logs: list) -> None:
    for process, log in zip(processes, logs, strict=True):
        try:
            process.wait(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            pytest.fail(f"torchrun still running after {LAUNCH_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        assert process.returncode == 0, log.read_text()[-3000:]


def test_two_nodes_train_the_same_weights_as_one_node_of_two(tmp_path):
    one_node = torchrun(
        ["--standalone", "--nproc-per-node", "2"], tmp_path / "one_node", tmp_path / "one_node.log"
    )
    finish([one_node], [tmp_path / "one_node.log"])

    port = free_port()
    nodes, logs = [], []
    for node_rank in (0, 1):
        rendezvous = [
            "--nnodes", "2", "--node-rank", str(node_rank), "--nproc-per-node", "1",
            "--master-addr", "127.0.0.1", "--master-port", str(port),
        ]  # fmt: skip
        logs.append(tmp_path / f"node{node_rank}.log")
        nodes.append(torchrun(rendezvous, tmp_path / "two_nodes", logs[-1]))
    finish(nodes, logs)

    expected = load_file(tmp_path / "one_node" / "final" / "model.safetensors")
    actual = load_file(tmp_path / "two_nodes" / "final" / "model.safetensors")
    assert expected.keys() == actual.keys()
    # Same global batch, same shards, same gloo all-reduce: the same arithmetic, so equal weights.
    assert max((expected[k] - actual[k]).abs().max().item() for k in expected) < 1e-6
    steps = (tmp_path / "two_nodes" / "result.json").read_text()
    assert '"step": 4' in steps  # 64 images / (2 ranks x 8)
