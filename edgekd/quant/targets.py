"""Where an int8 file will run, and what that asks of its weights.

onnxruntime runs a QDQ Conv/Gemm as u8 (activations) x s8 (weights). On x86 without VNNI
(AVX2-only, and AVX-512 without VNNI) its kernels use VPMADDUBSW, which adds two u8*s8
products into an int16 and *saturates*: with full 8-bit weights (|q| <= 127) a pair can
reach 2*255*127 = 64770 > 32767, and the file computes something else on those CPUs than
on the build machine (onnxruntime's quantization docs; OpenVINO documents the same
"saturation issue"). VNNI/AMX (VPDPBUSD) and ARM (widening multiplies, dot products)
accumulate in int32 and never saturate.

7-bit weights (|q| <= 64, onnxruntime's `reduce_range`) bound every pair by
2*255*64 = 32640, so the same file gives the same numbers on every CPU. That is the
`portable` target, the default: the artifact is built on one machine and shipped to
another. A target trades that for the eighth weight bit where the deployment CPU is
known to take it. QAT simulates the chosen target's weight grid (quant.qat), so the
trained model and the shipped file agree."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import EdgekdError


@dataclass(frozen=True)
class Target:
    name: str
    weight_qmax: int  # symmetric int8 weight grid: q in [-weight_qmax, weight_qmax]
    runs_on: str  # where its int8 kernels compute exactly the Q/DQ math

    @property
    def reduce_range(self) -> bool:
        return self.weight_qmax < 127

    def exact_on(self, isa: list[str], arch: str) -> bool:
        """Whether onnxruntime's int8 kernels on a CPU with these ISA flags compute this target's
        Q/DQ math exactly (no int16 saturation)."""
        return self.reduce_range or not saturating_cpu(isa, arch)


TARGETS = {
    "portable": Target("portable", 64, "every CPU (x86 with or without VNNI, ARM)"),
    "x86_avx2": Target("x86_avx2", 64, "every CPU; 7-bit weights avoid AVX2's int16 saturation"),
    "x86_vnni": Target("x86_vnni", 127, "x86 with AVX-512 VNNI, AVX-VNNI or AMX, and ARM; saturates on AVX2-only x86"),
    "arm": Target("arm", 127, "ARM (and x86 with VNNI/AMX); saturates on AVX2-only x86"),
}
TARGET_NAMES = (*TARGETS, "native")


def saturating_cpu(isa: list[str], arch: str) -> bool:
    """x86 whose u8s8 kernels pair products in int16 (no VNNI/AMX): AVX2-only or AVX-512 without VNNI."""
    if arch not in ("x86_64", "AMD64", "i686", "x86"):
        return False
    return not any(f in isa for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


def resolve_target(name: str, isa: list[str] | None = None, arch: str | None = None) -> Target:
    """The target for `name`; `native` picks the one that suits this machine."""
    if name == "native":
        if isa is None or arch is None:
            from ..bench.machine import machine_info

            m = machine_info()
            isa, arch = m["isa"], m["arch"]
        if arch not in ("x86_64", "AMD64", "i686", "x86"):
            return TARGETS["arm"]
        return TARGETS["x86_avx2" if saturating_cpu(isa, arch) else "x86_vnni"]
    if name not in TARGETS:
        raise EdgekdError(f"quantize.target: unknown target {name!r} (expected one of {', '.join(TARGET_NAMES)})")
    return TARGETS[name]
