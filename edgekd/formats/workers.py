"""Writing the export stage's files side by side, one worker process per core.

An ExecuTorch or LiteRT conversion is seconds to tens of seconds of single-threaded Python
(torch.export, decompositions, the delegate's lowering), and a run with per-runtime int8 plans
(formats.int8_plan) has a dozen or more of them, so on one core they were most of the export
stage. They are independent, so they run in `spawn`ed worker processes (a fork of a process
whose thread pools are running is not safe), all of them before anything is verified or timed:
a plan's timing beside a busy conversion would measure the machine's load, not the program.

One worker per core, at most one per WORKER_MEMORY of available memory (a worker holds torch,
ExecuTorch and litert-torch, and a teacher being lowered), and none where there are too few
conversions to repay the workers' start (FEW): then they run here, one after another.

The workers outlive one round of conversions (`conversion_pool`): the export stage times the
PTQ file's int8 programs between two rounds, to know which of the QAT file's to write
(stages.export), and idle workers take no CPU from that timing."""

from __future__ import annotations

import functools
import multiprocessing
import pickle
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..bench.machine import usable_cores
from ..errors import EdgekdError
from .base import ConvertJob, Format, Variant

WORKER_MEMORY = 3 * 2**30  # bytes a worker may take at its peak (benchmarks/README.md, "export workers")
FEW = 3  # this many conversions or fewer run in this process: starting a worker costs about one conversion


@dataclass
class Conversion:
    """One file to write: `fmt`'s export of `variant` at `path` (picklable, for a worker)."""

    fmt: type[Format]
    variant: Variant
    path: Path
    job: ConvertJob
    keep_fp32: list[str] = field(default_factory=list)

    def run(self) -> float:
        """Write the file on one thread, in a worker or here alike, and return the seconds it
        took. A file must not depend on `export.workers`: PT2E calibration runs the model on
        PyTorch's float kernels, and on some (AVX2) those round an observer's range an ulp apart
        on one and two threads, which moves int8 roundings (benchmarks/README.md, twentieth
        session)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        try:
            self.fmt().export(self.variant, self.path, self.job, keep_fp32=self.keep_fp32)
        finally:
            torch.set_num_threads(threads)
        return time.perf_counter() - t0

    def cost(self) -> int:
        """Rank by expected time, for handing the longest out first: a format's own int8 (PT2E:
        calibration and a larger graph to lower) takes about twice its fp32 conversion, and
        ONNX (TorchScript export or a copy) is cheap."""
        own = self.fmt.own_int8
        return 2 if own and self.variant.int8 else 1 if own else 0


@dataclass(frozen=True)
class NpyFile:
    """Calibration images saved once by the stage and read by each worker (a callable, as
    ConvertJob.calibration wants), instead of pickling the array into every conversion."""

    path: Path

    def __call__(self) -> np.ndarray:
        return _load(self.path)


@functools.cache
def _load(path: Path) -> np.ndarray:
    return np.load(path)


def worker_count(setting: int | str, conversions: int) -> int:
    """How many worker processes write `conversions` files (0: this process does)."""
    if conversions <= FEW or setting == 1:
        return 0
    if setting != "auto":
        return min(int(setting), conversions)
    cores = usable_cores()
    return max(0, min(cores, conversions, _available_memory() // WORKER_MEMORY)) if cores > 1 else 0


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return WORKER_MEMORY * 2  # unknown (not Linux): two workers


@contextmanager
def conversion_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    """`workers` spawned worker processes for one or more `convert_all` rounds (None for 0: the
    files are written in this process)."""
    if not workers:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker) as pool:
        yield pool


def convert_all(todo: list[Conversion], pool: ProcessPoolExecutor | None, desc: str = "export: convert"
                ) -> dict[str, float]:
    """Write every file of `todo` in `pool`'s workers (conversion_pool; None: here, one by one),
    with a progress bar; the first failure stops the rest and is raised as it was raised there.
    Returns the seconds each file took (file name -> seconds), slowest first."""
    bar = tqdm(total=len(todo), desc=desc, unit="file", leave=False)
    seconds: dict[str, float] = {}
    try:
        if pool is None:
            for c in todo:
                bar.set_postfix_str(c.path.name, refresh=True)
                seconds[c.path.name] = c.run()
                bar.update(1)
            return _slowest_first(seconds)
        local = [c for c in todo if not _picklable(c)]  # e.g. a model holding a lambda: written here
        portable = [c for c in todo if all(c is not x for x in local)]
        running = {pool.submit(c.run): c for c in sorted(portable, key=Conversion.cost, reverse=True)}
        try:
            for c in local:
                seconds[c.path.name] = c.run()
                bar.update(1)
            for done in as_completed(running):
                seconds[running[done].path.name] = done.result()
                bar.set_postfix_str(running[done].path.name, refresh=False)
                bar.update(1)
        except BrokenProcessPool:
            raise EdgekdError(f"export: a conversion worker process died (out of memory?) while writing one of "
                              f"{', '.join(c.path.name for f, c in running.items() if not f.done() or f.exception())}; "
                              f"set export.workers: 1 to convert in this process") from None
        finally:
            for f in running:
                f.cancel()
        return _slowest_first(seconds)
    finally:
        bar.close()


def _slowest_first(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])}


def _picklable(c: Conversion) -> bool:
    try:
        pickle.dumps(c)
        return True
    except Exception:  # whatever a model's own __reduce__ raises
        return False


def _start_worker() -> None:
    """A worker imports the toolchains once, for all its conversions (each of which keeps to one
    thread in Conversion.run, so the workers do not contend for the cores)."""
    from ..native_logs import quiet_native_output

    with quiet_native_output(stdout=True):  # the toolchains' import-time banners, already shown by the stage
        for name in ("executorch", "litert_torch"):
            try:
                __import__(name)
            except ImportError:
                pass
