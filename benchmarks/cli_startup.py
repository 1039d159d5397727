"""Start-up time and peak memory of the CLI: what a user pays before any work.

    python benchmarks/cli_startup.py [--repeats 5]

Each row runs one command in a fresh process `--repeats` times and prints the median wall time and
the largest peak resident memory (the child's `ru_maxrss`). A typo and `--help` must answer at
once; `flyeva models` counts every named size's parameters on the meta device, so its memory stays
that of the import, not of the 1B-parameter EVA-g (about 4 GB in fp32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = (
    ("flyeva --help", ["--help"]),
    ("flyeva pretrain --help", ["pretrain", "--help"]),
    ("flyeva pretrian (a typo)", ["pretrian"]),
    ("flyeva detect train --print-config", ["detect", "train", "--print-config"]),
    ("flyeva models", ["models"]),
)


def run_once(arguments: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python -m flyeva.cli ARGUMENTS` in a fresh process."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "flyeva.cli", *arguments], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)  # fmt: skip
    _, _, usage = os.wait4(process.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, 1-min load {os.getloadavg()[0]:.1f}")
    print(f"{'command':<36} {'median s':>8} {'min s':>6} {'peak MiB':>8}")
    for name, arguments in COMMANDS:
        runs = [run_once(arguments) for _ in range(args.repeats)]
        seconds = [s for s, _ in runs]
        peak = max(m for _, m in runs)
        print(f"{name:<36} {statistics.median(seconds):>8.2f} {min(seconds):>6.2f} {peak:>8.0f}")
    print("wall time of the whole process (interpreter start, imports, the command); peak = ru_maxrss")


if __name__ == "__main__":
    main()
