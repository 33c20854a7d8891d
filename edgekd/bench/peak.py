"""Peak memory of one model on one runtime, measured in a fresh child process.

A process's high-water mark only grows, so measuring several models in the benchmark's own
process would report the largest one for all. The child imports the runtime, records its
resident memory and resets the kernel's high-water mark (/proc/self/clear_refs, Linux >= 4.0;
importing torch alone peaks near 1 GB), then loads the model and runs it at both batch sizes:
`peak_rss_mb` is the process peak from then on, `model_peak_mb` that minus the import.

    python -m edgekd.bench.peak RUNTIME MODEL THREADS IMAGE_SIZE BATCH THROUGHPUT_BATCH
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024  # kB


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _child(runtime: str, path: str, threads: int, size: int, batch: int, tbatch: int) -> dict:
    import numpy as np

    from .runtimes import RUNTIMES

    rt = RUNTIMES.get(runtime)()
    rt.preload()
    base = _status_mb("VmRSS")
    reset = _reset_peak()
    run = rt.load(Path(path), threads)
    rng = np.random.default_rng(0)
    for b in (batch, tbatch):
        x = rng.standard_normal((b, 3, size, size), dtype=np.float32)
        for _ in range(3):
            run(x)
    peak = _status_mb("VmHWM")
    out = {"peak_rss_mb": round(peak, 1), "runtime_rss_mb": round(base, 1), "model_peak_mb": round(max(0.0, peak - base), 1)}
    if not reset:  # the peak may be the import's
        out["peak_includes_import"] = True
    return out


def measure_peak(runtime: str, path: Path, threads: int, image_size: int, batch: int, throughput_batch: int,
                 timeout: float = 600) -> dict:
    """{peak_rss_mb, runtime_rss_mb, model_peak_mb} or {peak_memory_error} - never raises."""
    cmd = [sys.executable, "-m", "edgekd.bench.peak", runtime, str(path), str(threads), str(image_size), str(batch),
           str(throughput_batch)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if p.returncode == 0:
            return json.loads(p.stdout.strip().splitlines()[-1])
        why = (p.stderr.strip().splitlines() or ["exit code %d" % p.returncode])[-1][:200]
    except (subprocess.TimeoutExpired, ValueError, IndexError, OSError) as e:
        why = type(e).__name__
    return {"peak_memory_error": why}


if __name__ == "__main__":
    a = sys.argv[1:]
    print(json.dumps(_child(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), int(a[5]))))
