"""Latency (p50/p90/p99 after warm-up, threads pinned), throughput, peak memory and accuracy."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .machine import machine_info
from .peak import measure_peak
from .runtimes import RUNTIMES

log = logging.getLogger("edgekd")


def time_runner(run, x: np.ndarray, warmup: int, runs: int) -> dict:
    for _ in range(warmup):
        run(x)
    ts = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        run(x)
        ts[i] = time.perf_counter() - t0
    ms = ts * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "runs": runs}


def bench_model(path: Path, runtime: str, threads: int, image_size: int, batch: int = 1, throughput_batch: int = 32,
                warmup: int = 30, runs: int = 200, eval_x: np.ndarray | None = None, eval_y: np.ndarray | None = None,
                macs: int | None = None, peak_memory: bool = True) -> dict:
    """All figures for one model file on one runtime at one thread count (peak memory in a
    child process, see bench.peak)."""
    rt = RUNTIMES.get(runtime)()
    rng = np.random.default_rng(0)
    run = rt.load(path, threads)
    x = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    res = {"runtime": runtime, "version": rt.version(), "format": rt.fmt, "file": path.name,
           "size_bytes": path.stat().st_size, "threads": threads, "batch": batch, **time_runner(run, x, warmup, runs)}
    xb = rng.standard_normal((throughput_batch, 3, image_size, image_size), dtype=np.float32)
    tb = time_runner(run, xb, max(2, warmup // 10), max(5, runs // 20))
    res["throughput_batch"] = throughput_batch
    res["throughput_ips"] = round(throughput_batch / (tb["p50_ms"] / 1e3), 1)
    res["batched_inference"] = rt.batched  # False: the program takes one image at a time
    if peak_memory:
        res.update(measure_peak(runtime, path, threads, image_size, batch, throughput_batch))
    if macs:
        gmacs = macs * batch / (res["p50_ms"] / 1e3) / 1e9
        res["gmacs_per_s"] = round(gmacs, 2)
        peak = fp32_peak_gmacs(threads)
        if peak:
            res["fp32_peak_gmacs_est"], res["fp32_peak_basis"] = round(peak[0], 1), peak[1]
            res["fraction_of_fp32_peak"] = round(gmacs / peak[0], 4)
    if eval_x is not None:
        logits = np.concatenate([run(eval_x[i : i + 250]) for i in range(0, len(eval_x), 250)])
        res["top1"] = round(100.0 * float((logits.argmax(1) == eval_y).mean()), 3)
        res["eval_images"] = int(len(eval_y))
    return res


def fp32_peak_gmacs(threads: int) -> tuple[float, str] | None:
    """Rough fp32 peak and how it was estimated: cores x nominal GHz x FMA units x SIMD lanes.

    The clock is /proc/cpuinfo's nominal one: a core boosting above it (and int8 kernels, which
    do 4 MACs per fp32 lane) can show a fraction above 1."""
    mhz = None
    try:
        with open("/proc/cpuinfo") as f:
            mhz = next(float(l.split(":")[1]) for l in f if l.startswith("cpu MHz"))
    except (OSError, StopIteration, ValueError):
        return None
    isa = machine_info()["isa"]
    lanes = 16 if "avx512f" in isa else 8 if "avx2" in isa else 4
    units = 2 if "fma" in isa else 1
    return threads * mhz / 1e3 * lanes * units, f"{threads} thread(s) x {mhz:.0f} MHz (nominal) x {units} FMA x {lanes} fp32 lanes"
