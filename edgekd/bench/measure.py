"""Latency (p50/p90/p99 after warm-up, threads pinned), throughput, peak memory and accuracy."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..formats import format_for
from .machine import machine_info, usable_cores
from .peak import measure_peak
from .runtimes import RUNTIMES

log = logging.getLogger("edgekd")


WARMUP_MS = 500.0  # warm-up stops here: a slow model (a teacher) is warm after a few calls
ROUND_MS = 100.0  # timed calls stop near this a round (time_interleaved), near 10x this in all (time_runner)
REWARM_CAP_MS = 50.0  # untimed calls before a model's calls in a round (time_interleaved) last at most this
MIN_CALLS = 3  # but at least this many either way
PEAK_CHILDREN = 4  # peak-memory child processes at once, at most one per core


def _warm(run, x: np.ndarray, warmup: int) -> float:
    """Warm `run` up with `warmup` calls, fewer once they pass WARMUP_MS; returns the last call's
    milliseconds (0 without warm-up), which size the timed calls that follow."""
    last = _timed(run, x) if warmup > 0 else 0.0
    for _ in range(min(warmup - 1, int(WARMUP_MS // max(last, 1e-3)))):
        last = _timed(run, x)
    return last


def _rewarm(run, x: np.ndarray, ms: float) -> None:
    """Untimed calls for about `ms`, at least one, before a model's timed calls in a round: the
    model timed before it evicted its weights from the caches, the more the longer that one ran.
    After a teacher a small model's first calls ran up to twice as slow, and with one untimed call
    the model that followed the teacher in most rounds was timed a third slower than its identical
    twin. Every model is re-warmed as long (time_interleaved), so none is timed hotter than another."""
    t0 = time.perf_counter()
    run(x)
    while (time.perf_counter() - t0) * 1e3 < ms:
        run(x)


def _calls(last_ms: float, budget_ms: float, most: int) -> int:
    """Timed calls for a model whose last call took `last_ms`: as many as fit in `budget_ms`, at
    least MIN_CALLS, at most `most`."""
    return min(most, max(MIN_CALLS, int(budget_ms // max(last_ms, 1e-3))))


def time_runner(run, x: np.ndarray, warmup: int, runs: int) -> dict:
    """One runner timed alone (throughput batches): p50/p90/p99 of `runs` calls after `warmup`,
    or of as many as fit in 10 x ROUND_MS, at least MIN_CALLS (a teacher at batch 32 takes about a
    second a call on one core, and its figure is steady within a call)."""
    runs = _calls(_warm(run, x, warmup), 10 * ROUND_MS, runs)
    ms = np.array([_timed(run, x) for _ in range(runs)])
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
            "p99_ms": round(float(np.percentile(ms, 99)), 4), "runs": runs}


def _timed(run, x: np.ndarray) -> float:
    t0 = time.perf_counter()
    run(x)
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(runners: dict, x: np.ndarray, warmup: int, runs: int, rounds: int) -> dict[str, dict]:
    """Time several runners in rounds, rotating their order each round, so a burst of load from
    another process lands on all of them alike instead of on whichever was timed in one block.

    p50 is the median of the per-round medians; `round_p50_ms` keeps those, so speed ratios
    are taken round by round (`round_ratio`), and `p50_iqr_ms` says how much rounds disagreed.
    A model's calls in a round stop near ROUND_MS, at least MIN_CALLS: a teacher takes fewer, its
    median steady with few, in as many rounds as the others."""
    names = list(runners)
    rounds = max(1, min(rounds, runs))
    warm_ms = {n: _warm(runners[n], x, warmup) for n in names}
    per_round = {n: _calls(warm_ms[n], ROUND_MS, runs // rounds) for n in names}  # rounds <= runs
    samples: dict[str, list[float]] = {n: [] for n in names}
    medians: dict[str, list[float]] = {n: [] for n in names}
    rewarm_ms = min(max(warm_ms.values()), REWARM_CAP_MS)  # as long as the slowest model's call
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            _rewarm(runners[n], x, rewarm_ms)
            ts = [_timed(runners[n], x) for _ in range(per_round[n])]
            samples[n] += ts
            medians[n].append(float(np.median(ts)))
    out = {}
    for n in names:
        ms, med = np.array(samples[n]), np.array(medians[n])
        out[n] = {"p50_ms": round(float(np.median(med)), 4), "p90_ms": round(float(np.percentile(ms, 90)), 4),
                  "p99_ms": round(float(np.percentile(ms, 99)), 4), "runs": int(len(ms)), "rounds": rounds,
                  "round_p50_ms": [round(float(v), 4) for v in med],
                  "p50_iqr_ms": [round(float(np.percentile(med, 25)), 4), round(float(np.percentile(med, 75)), 4)]}
    return out


def runs_within(run, x: np.ndarray, budget_ms: float, lo: int = 40, hi: int = 200) -> int:
    """How many timed calls of `run` fit in about `budget_ms` (at least `lo`, at most `hi`), from
    a short first timing: plan searches time many candidates against one reference this way."""
    t0 = time_interleaved({"ref": run}, x, 10, 20, 1)["ref"]["p50_ms"]
    return int(max(lo, min(hi, budget_ms / max(t0, 1e-3))))


def per_round_ratios(slow: dict, fast: dict) -> np.ndarray | None:
    """slow/fast round by round, where both were timed in the same rounds (time_interleaved)."""
    a, b = slow.get("round_p50_ms"), fast.get("round_p50_ms")
    return np.array(a) / np.array(b) if a and b and len(a) == len(b) else None


def round_ratio(slow: dict, fast: dict) -> float:
    """slow/fast speed ratio: the median of the per-round ratios when both were timed in the same
    rounds, else the ratio of their p50s."""
    rounds = per_round_ratios(slow, fast)
    return round(float(np.median(rounds) if rounds is not None else slow["p50_ms"] / fast["p50_ms"]), 3)


def bench_models(paths: dict[str, Path], runtime: str, threads: int, image_size: int, batch: int = 1,
                 throughput_batch: int = 32, warmup: int = 30, runs: int = 200, rounds: int = 10,
                 eval_x: np.ndarray | None = None, eval_y: np.ndarray | None = None, macs: dict | None = None,
                 peak_memory: bool = True, on_error=None, eval_skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """All figures for several model files on one runtime at one thread count: latency timed
    interleaved (time_interleaved) and throughput, then, with no timing left to disturb, peak
    memory (a child process per model, see bench.peak) beside accuracy per model (except those in
    `eval_skip`). A model that
    fails to load or run is passed to `on_error(name, exc)` and left out; without `on_error`
    the error propagates."""
    rt = RUNTIMES.get(runtime)()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    runners = {}
    for name, path in paths.items():
        try:
            runners[name] = rt.load(path, threads)
            runners[name](x)
        except Exception as e:
            if on_error is None:
                raise
            on_error(name, e)
            runners.pop(name, None)
    timed = time_interleaved(runners, x, warmup, runs, rounds)
    xb = rng.standard_normal((throughput_batch, 3, image_size, image_size), dtype=np.float32)
    out = {}
    for name, run in list(runners.items()):  # every timing first, on a machine with nothing else of ours running
        path = paths[name]
        try:
            res = {"runtime": runtime, "version": rt.version(), "format": format_for(path).key, "file": path.name,
                   "size_bytes": path.stat().st_size, "threads": threads, "batch": batch, **timed[name]}
            tb = time_runner(run, xb, max(2, warmup // 10), max(5, runs // 20))
            res["throughput_batch"] = throughput_batch
            res["throughput_ips"] = round(throughput_batch / (tb["p50_ms"] / 1e3), 1)
            res["batched_inference"] = rt.batched  # False: the program takes one image at a time
            m = (macs or {}).get(name)
            if m:
                gmacs = m * batch / (res["p50_ms"] / 1e3) / 1e9
                res["gmacs_per_s"] = round(gmacs, 2)
                peak = fp32_peak_gmacs(threads)
                if peak:
                    res["fp32_peak_gmacs_est"], res["fp32_peak_basis"] = round(peak[0], 1), peak[1]
                    res["fraction_of_fp32_peak"] = round(gmacs / peak[0], 4)
        except Exception as e:
            if on_error is None:
                raise
            on_error(name, e)
            runners.pop(name)
            continue
        out[name] = res
    # untimed from here: each model's peak memory in its own child process, beside accuracy here; the
    # children may share the cores (memory is what they measure), and a child that imports ExecuTorch
    # spends seconds in the import and holds most of a GB
    with ThreadPoolExecutor(max(1, min(usable_cores(), PEAK_CHILDREN))) as pool:
        peaks = {name: pool.submit(measure_peak, runtime, paths[name], threads, image_size, batch, throughput_batch)
                 for name in runners} if peak_memory else {}
        for name, run in runners.items():
            try:
                if eval_x is not None and name not in eval_skip:
                    logits = np.concatenate([run(eval_x[i : i + 250]) for i in range(0, len(eval_x), 250)])
                    out[name]["top1"] = round(100.0 * float((logits.argmax(1) == eval_y).mean()), 3)
                    out[name]["eval_images"] = int(len(eval_y))
            except Exception as e:
                if on_error is None:
                    raise
                on_error(name, e)
                out.pop(name)
        for name, f in peaks.items():
            if name in out:
                out[name].update(f.result())
    return out


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
