"""Data-parallel training under torchrun: rank 0 runs the pipeline, the other ranks train with it.

`torchrun --nproc_per_node=N -m edgekd run pipelines/x.yaml` starts N copies of edgekd. Rank 0
is the ordinary single-process run: it owns the run directory, decodes the data, computes the
teacher logits, prunes, quantizes, exports, benchmarks and writes every file and report. Each
training run (`train.fit`: distill and its baseline, every prune fine-tune, QAT, an assistant)
is a job rank 0 hands to the others (the model as it stands, the objective with its teachers
and logit table, the training options); every rank then trains one shard of each global batch
under DistributedDataParallel (train._fit), so the others get the pruned or fake-quantized model
with the job and never decide anything themselves. The forward-only work that grows with the
data is split the same way: a teacher's logit table and BatchNorm re-estimation (each rank
takes every ranks-th batch, and the shares are summed). Only rank 0 evaluates, checkpoints and
reports. Single-process runs never touch this module's collectives.

A rank that fails ends the run: rank 0 tells the others to stop when it fails outside a
training job; inside one, the surviving ranks' next collective fails (gloo: the peer closed the
connection; NCCL: its timeout) and each says so in one line, and torchrun ends the group. When
torchrun's SIGTERM to the survivors comes first, they end with the same kind of line (`_stopped`)."""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache

import torch

from .errors import EdgekdError

log = logging.getLogger("edgekd")
TIMEOUT = timedelta(minutes=30)  # a collective waiting longer than this on a silent rank fails


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank}/{self.size}"


@lru_cache(maxsize=1)
def world() -> World:
    """This process's place in a torchrun group (WORLD_SIZE, RANK, LOCAL_RANK); one rank without."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise EdgekdError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None


def init(device: torch.device) -> torch.device:
    """Join the process group (NCCL on GPUs, gloo on CPUs) and return this rank's device."""
    w = world()
    if w.size == 1 or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(w.local_rank)
        device = torch.device("cuda", w.local_rank)
    try:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    except Exception as e:
        raise EdgekdError(f"{w}: cannot join the torchrun process group ({str(e).splitlines()[0][:200]})") from None
    if not w.main:
        logging.getLogger("edgekd").setLevel(logging.WARNING)  # rank 0 reports; the others speak up only to warn
    signal.signal(signal.SIGTERM, _stopped)
    return device


_doing: list[str] = []  # what this rank's open collectives are for, innermost last


def _stopped(signum, frame) -> None:
    """SIGTERM in a torchrun group: torchrun sends it to the surviving ranks when one dies, and it
    may come before this rank's own collective notices the lost peer. Without a handler the rank
    would vanish without a word (and rank 0 without marking the run failed); this ends it with one
    line, through the usual error path (manifest, exit status)."""
    failing()
    what = _doing[-1] if _doing else "waiting for the other ranks"
    raise EdgekdError(f"{world()}: stopped while {what}: torchrun ended the group (another rank failed, its own "
                      "error is above, or the job was cancelled)")


def failing() -> None:
    """This rank is ending with an error: a SIGTERM from torchrun now (it sends one to every
    survivor) must not interrupt recording it (the manifest) with a second error."""
    if signal.getsignal(signal.SIGTERM) is _stopped and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


_failed_in_job: list[bool] = []  # set when a training job (train.fit) of this rank raised


@contextmanager
def job():
    """Mark a training job: a failure inside one leaves the other ranks in a collective."""
    try:
        yield
    except BaseException:
        _failed_in_job.append(True)
        raise


def release_ranks(failed: bool = False) -> None:
    """Rank 0, when the pipeline ends: tell the other ranks there is no next job. After a failure
    inside a job they are in a collective instead and learn it from this process's exit."""
    w = world()
    if w.size > 1 and w.main and torch.distributed.is_initialized() and not (failed and _failed_in_job):
        try:
            broadcast(None)
        except EdgekdError:
            pass  # they are gone already


def finish() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def broadcast(obj=None):
    """Rank 0's `obj` on every rank. Modules and tensors travel as torch.save bytes and arrive on
    the CPU (each rank moves them to its own device)."""
    payload = [None]
    if world().main:
        buf = io.BytesIO()
        torch.save(obj, buf)
        payload = [buf.getvalue()]
    collective(lambda: torch.distributed.broadcast_object_list(payload, src=0), "receiving the next job")
    if world().main:
        return obj
    return torch.load(io.BytesIO(payload[0]), map_location="cpu", weights_only=False)  # rank 0's own message


PEER_LOST = ("Connection closed by peer", "Connection reset", "Broken pipe", "NCCL", "timed out", "Timed out")


def collective(op, what: str):
    """Run `op` (collectives, or training that runs them inside DDP); a rank that stopped turns
    the error into one line naming this rank (other errors pass unchanged)."""
    _doing.append(what)
    try:
        return op()
    except (RuntimeError, ConnectionError) as e:  # gloo: "Connection closed by peer", NCCL: timeouts
        first = (str(e).splitlines() or [""])[0]
        if world().size == 1 or not any(m in first for m in PEER_LOST):
            raise
        failing()
        raise EdgekdError(f"{world()}: lost another rank while {what} ({first[:120]}); its own error is above") from None
    finally:
        _doing.pop()


def all_sum(t: torch.Tensor, what: str) -> torch.Tensor:
    """Sum of `t` over the ranks (in place, also returned)."""
    collective(lambda: torch.distributed.all_reduce(t), what)
    return t


def share(together: bool) -> tuple[int, int]:
    """(rank, ranks) of the part of a forward-only pass this process takes: all of it, unless
    every rank of the group makes the same call (`together`, after `everywhere`)."""
    w = world()
    return (w.rank, w.size) if together else (0, 1)


def everywhere(task: str, **job) -> None:
    """Rank 0, in a torchrun group: have every other rank run `task` (see `serve`) with `job`,
    alongside the same call here; a no-op in a single process."""
    if world().size > 1 and world().main:
        broadcast({"task": task, **job})


def serve(cfg, device: torch.device) -> None:
    """A rank other than 0: run each job rank 0 sends (`everywhere`) until it sends None: train
    (train.fit), compute a share of a teacher's logit table, or of BatchNorm statistics."""
    from pydantic import TypeAdapter

    from .bn import recalibrate_bn
    from .data import load_data
    from .distill import Objective, term_type
    from .train import fit

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data, term = None, TypeAdapter(term_type())
    while (job := broadcast()) is not None:  # None: rank 0 has finished the pipeline
        if data is None:  # rank 0 has decoded and cached it by now
            data = load_data(cfg.data, cfg.seed)
        task = job.pop("task")
        if task == "teacher_logits":
            job["source"].bind(data, device)
            job["source"].logit_table(job["views"], together=True)
        elif task == "recalibrate_bn":
            recalibrate_bn(job["model"].to(device), data, device, job["images"], job["seed"], together=True)
        else:
            for src in job["teachers"].values():
                src.bind(data, device)
            # options travel as plain data: term classes are made at run time and do not pickle
            objective = Objective([term.validate_python(t) for t in job["terms"]], lambda name, _: job["teachers"][name])
            fit(job["model"], data, job["cfg_type"].model_validate(job["cfg"]), device, seed=job["seed"],
                objective=objective, state_path=job["state_path"], desc=job["desc"])
