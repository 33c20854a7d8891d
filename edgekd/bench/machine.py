"""CPU model and ISA flags, reported next to every speed figure and int8 verification.

The flags come from the CPUID instruction as numpy's runtime dispatch reads it (what the
kernels themselves dispatch on, also under an emulator or a masked virtual CPU), with
/proc/cpuinfo for the flags numpy does not report (AMX, AVX-VNNI, ARM features). Flags the
kernel lists but CPUID hides are named (`hidden_isa`), so a figure taken on a masked or
emulated CPU says so."""

from __future__ import annotations

import os
import platform
import sys
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
    seen = _with_cpuid(flags)
    hidden = {f for f in _CPUID if f in flags and f not in seen}  # the CPU has them, CPUID hides them here
    if hidden:  # an emulator or benchmarks/avx2's mask: what only /proc/cpuinfo reports cannot be checked, so is not claimed
        hidden |= seen & _PROC_ONLY
        seen -= _PROC_ONLY
    info = {"cpu": cpu, "arch": platform.machine(), "cores": os.cpu_count(), "isa": [f for f in _ISA if f in seen]}
    if hidden:
        info["hidden_isa"] = [f for f in _ISA if f in hidden]
    torch = sys.modules.get("torch")  # where this process runs PyTorch (`edgekd bench` of a file need not import it)
    if torch is not None and hasattr(torch.backends, "cpu"):  # below the CPU's best where ATEN_CPU_CAPABILITY caps it
        info["torch_kernels"] = torch.backends.cpu.get_cpu_capability()
    return info


_PROC_ONLY = {"avx_vnni", "amx_int8", "amx_bf16"}  # x86 flags numpy's CPUID dispatch does not report
_CPUID = {"sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "fma": "FMA3", "f16c": "F16C", "avx512f": "AVX512F",
          "avx512bw": "AVX512BW", "avx512_vnni": "AVX512VNNI", "avx512_bf16": "AVX512BF16"}


def usable_cores() -> int:
    """Cores this process may run on (its affinity, e.g. a container's CPU set), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _with_cpuid(flags: set[str]) -> set[str]:
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as cpuid
    except ImportError:
        return flags
    if "AVX2" not in cpuid:  # not x86
        return flags
    out = {f for f in flags if f not in _CPUID} | {f for f, k in _CPUID.items() if cpuid.get(k)}
    if not cpuid.get("AVX512F"):
        out -= {"amx_int8", "amx_bf16"}
    if not cpuid.get("AVX2"):
        out.discard("avx_vnni")
    return out


def isa_text(info: dict) -> str:
    """The ISA flags of a `machine_info()` (a report's `machine`) in words, with those CPUID hid."""
    hidden = info.get("hidden_isa")
    return (", ".join(info.get("isa", [])) or "no SIMD flags found") + \
        (f"; CPUID hides {', '.join(hidden)} (emulated or masked CPU)" if hidden else "")


def int8_class(isa: list[str], arch: str) -> str:
    """The CPU class that decides int8 kernels and their rounding, in words."""
    if arch not in ("x86_64", "AMD64", "i686", "x86"):
        return f"{arch} (ARM: {'dot-product' if 'asimddp' in isa else 'NEON'} int8)"
    best = next((name for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"),
                                         ("avx_vnni", "AVX-VNNI"), ("avx512bw", "AVX-512 without VNNI"),
                                         ("avx2", "AVX2 without VNNI")) if flag in isa), "pre-AVX2")
    return f"x86-64 {best}"
