"""How a benchmark script runs a child program on this x86 CPU seen as an AVX2-only one (no
AVX-512, no VNNI, no AMX), so that onnxruntime, XNNPACK and PyTorch pick their AVX2 kernels.

Two ways, one choice for every script that needs it:
- "mask": natively, with CPUID masked (run.sh beside this file), at full speed; needs CPUID
  faulting (`cpuid_fault` in /proc/cpuinfo) and a C compiler. Whole test splits fit.
- "qemu": emulated by qemu-x86_64 -cpu EPYC-Rome, about 100x slower; works on any x86 with
  Debian's qemu-user, so only a sample of the test images fits.

Scripts import it as `from avx2.launch import avx2_prefix` (python benchmarks/<script>.py puts
benchmarks/ on sys.path)."""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_SH = Path(__file__).resolve().with_name("run.sh")
WAYS = ("auto", "mask", "qemu", "off")
PREFIX = {"mask": ["sh", str(RUN_SH)], "qemu": ["qemu-x86_64", "-cpu", "EPYC-Rome"]}
LABEL = {"mask": "CPUID masked (native AVX2 kernels)", "qemu": "qemu EPYC-Rome (emulated)"}


def missing(way: str) -> str | None:
    """Why this machine cannot run `way` ("mask" or "qemu"), or None."""
    if way == "qemu":
        return None if shutil.which("qemu-x86_64") else "qemu-x86_64 not found (Debian: apt install qemu-user)"
    try:
        fault = "cpuid_fault" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        fault = False
    if not fault:
        return "this CPU or kernel cannot fault CPUID (no cpuid_fault in /proc/cpuinfo)"
    return None if shutil.which("cc") else "no C compiler (cc) to build the mask"


def avx2_prefix(way: str = "auto") -> tuple[str, list[str], str] | None:
    """(way, command prefix, words for a table header), or None where `way` is "off" or "auto"
    finds neither. "auto" prefers the mask (native speed) to qemu. An explicit way that this
    machine lacks is an error saying what is missing."""
    if way not in WAYS:
        raise SystemExit(f"--avx2: expected one of {', '.join(WAYS)}, got {way!r}")
    for w in {"auto": ("mask", "qemu"), "off": ()}.get(way, (way,)):
        if not missing(w):
            return w, PREFIX[w], LABEL[w]
    if way in PREFIX:
        raise SystemExit(f"--avx2 {way}: {missing(way)}")
    return None
