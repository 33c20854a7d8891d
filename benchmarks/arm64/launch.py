"""How a benchmark script runs its child programs on emulated ARM64 phone cores: qemu-aarch64 in
the aarch64 Python that setup.sh beside this file builds, one single-threaded emulator per core
model, side by side. The ARM twin of avx2/launch.py.

Scripts import it as `from arm64.launch import CORES, arm_cores, side_by_side` (python
benchmarks/<script>.py puts benchmarks/ on sys.path)."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

CORES = "cortex-a53,cortex-a76"  # plain NEON (the low-end phone core); dot-product int8 (most phones since 2019)


def arm_cores(spec: str, python: str, setup: str) -> list[str]:
    """The core models `spec` names (`qemu-aarch64 -cpu help`, comma-separated; '' = none), or none,
    said in one line, where there is no aarch64 Python at `python` (`setup`: the command that builds it)."""
    cores = [c for c in spec.split(",") if c]
    if cores and not Path(python).exists():
        print(f"no aarch64 Python at {python} ({setup}): no ARM columns", file=sys.stderr, flush=True)
        return []
    return cores


def side_by_side(cores: list[str], run: Callable[[dict], str]) -> list[str]:
    """`run(env)` once per core model, all at once, with env naming the core (QEMU_CPU) for the
    aarch64 Python; returns what each returned (the CPU class the child saw), in `cores`' order."""
    with ThreadPoolExecutor(len(cores)) as pool:
        return list(pool.map(lambda core: run({**os.environ, "QEMU_CPU": core}), cores))
