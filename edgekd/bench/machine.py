"""CPU model and ISA flags, reported next to every speed figure."""

from __future__ import annotations

import os
import platform
from functools import lru_cache

_ISA = ["sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16", "neon", "asimd", "asimddp"]


@lru_cache(maxsize=1)
def machine_info() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":")[0].strip()
                if key == "model name":
                    cpu = line.split(":", 1)[1].strip()
                elif key in ("flags", "Features"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(), "isa": [f for f in _ISA if f in flags]}
