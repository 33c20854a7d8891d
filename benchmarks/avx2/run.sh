#!/bin/sh
# Run a command natively, at full speed, on this x86 CPU seen as an AVX2-only EPYC (Rome class):
# no AVX-512, no VNNI, no AMX, so onnxruntime, OpenVINO, XNNPACK and PyTorch pick their AVX2
# kernels (how: cpuid_mask.c). For AVX2-only speed ratios and int8 numerics without an AVX2-only
# machine; qemu-x86_64 -cpu EPYC-Rome gives the same kernels' numbers but ~100x slower.
#
#   bash benchmarks/avx2/run.sh COMMAND [ARGS...]
#   e.g. bash benchmarks/avx2/run.sh edgekd run pipelines/ci_smoke.yaml
#
# Needs a C compiler and CPUID faulting (the cpuid_fault flag in /proc/cpuinfo: Intel since Ivy
# Bridge, AMD Zen 4/5 with Linux 6.x; most virtual machines pass it through). The library is
# built once into $EDGEKD_CPUID_MASK (default: $XDG_CACHE_HOME or ~/.cache, edgekd/cpuid_mask.so).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ "$#" -gt 0 ] || { echo "usage: bash benchmarks/avx2/run.sh COMMAND [ARGS...]" >&2; exit 2; }
grep -qw cpuid_fault /proc/cpuinfo 2>/dev/null || {
    echo "benchmarks/avx2/run.sh: this CPU or kernel cannot fault CPUID (no cpuid_fault in /proc/cpuinfo); use qemu-x86_64 -cpu EPYC-Rome" >&2
    exit 2
}
lib=${EDGEKD_CPUID_MASK:-${XDG_CACHE_HOME:-$HOME/.cache}/edgekd/cpuid_mask.so}
if [ ! -f "$lib" ] || [ "$here/cpuid_mask.c" -nt "$lib" ]; then
    mkdir -p "$(dirname "$lib")"
    cc -O2 -Wall -shared -fPIC -o "$lib.$$" "$here/cpuid_mask.c" -ldl
    mv -f "$lib.$$" "$lib"   # atomic: a concurrent run never loads a half-written library
fi
# torch.compile's cache must not be shared with unmasked runs: a graph cached for AVX-512 and reused
# by a process that sees AVX2 trained to NaN at its first step (torch 2.14.1)
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/torchinductor_$(id -un)}-avx2-mask"
LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" exec "$@"
