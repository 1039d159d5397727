"""The machine's matmul ceiling (fp32 unless told): GFLOP/s of a large square `torch.matmul`, best of N.

    python benchmarks/matmul_ceiling.py [--size 2048] [--repeats 5] [--device cpu|cuda] [--dtype fp32|bf16]

Other benchmarks import it (`sys.path` holds this folder when they run as scripts):

    from matmul_ceiling import matmul_gflops
    all_cores = matmul_gflops(2048)             # every thread torch uses
    one_core = matmul_gflops(2048, threads=1)   # torch.set_num_threads(1) for the measurement only
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator on a GPU, else the resident set (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def matmul_gflops(
    size: int = 2048,
    *,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
) -> float:
    """Best GFLOP/s (2 * size**3 FLOPs per product) of `repeats` timed square matmuls after one warm-up.

    `threads` changes torch's intra-op thread count for the measurement only (CPU).
    """
    device = torch.device(device)
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        left = torch.randn(size, size, device=device, dtype=dtype)
        right = torch.randn(size, size, device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        # A product under ~0.2 s is timed as a loop so the timer's resolution does not matter.
        inner = 20 if device.type == "cuda" else 1
        best = float("inf")
        for attempt in range(repeats + 1):
            sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                torch.matmul(left, right, out=out)
            sync(device)
            elapsed = (time.perf_counter() - start) / inner
            if attempt > 0:  # the first run is the warm-up (allocation, MKL/cuBLAS heuristics)
                best = min(best, elapsed)
        return 2 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(previous_threads)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=0, help="matrix side (0: 2048 CPU, 8192 CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs; the best one counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = parser.parse_args()
    args.size = args.size or (8192 if args.device.startswith("cuda") else 2048)
    dtype = DTYPES[args.dtype]
    rows = [(f"all ({torch.get_num_threads()} threads)", None)]
    if args.device == "cpu":
        rows.append(("single thread", 1))
    print(f"torch {torch.__version__}, {args.dtype} matmul {args.size}x{args.size}, best of {args.repeats}")
    for label, threads in rows:
        gflops = matmul_gflops(
            args.size, repeats=args.repeats, device=args.device, dtype=dtype, threads=threads
        )
        print(f"{label:>22}: {gflops:9.1f} GFLOP/s")


if __name__ == "__main__":
    main()
