"""Training the teacher-free baseline in a child process beside the distillation run, on a CPU.

A MobileNet-class student at CIFAR size trains on two cores at about 1.7x its speed on one:
the step's Python, the optimizer and many small kernels do not split across threads, and two
one-thread processes get about 1.15x more done than one on two threads. So the distill stage's
two runs (`compare_baseline`) finish sooner side by side, each on half the
threads, than one after the other on all of them (benchmarks/README.md, "baseline beside").
The baseline needs no teacher, so it is the run that moves: a spawned child (a fork of a
process whose thread pools run is not safe) gets the initial weights and the data as bytes (a
memory-mapped split is mapped again there; nothing goes through /dev/shm, which containers keep
small) and trains with the same loop and seed; the distillation run stays here with its
teachers (an ONNX teacher cannot be pickled).

Only where that pays: a CPU, one process (torchrun ranks already share the cores), two or more
threads, no torch.compile, training images in RAM of at most SEND_AT_MOST (the child holds a
copy) or memory-mapped, and teachers whose outputs all come from the logit cache, so both
runs cost about the same per step (a live teacher makes the distillation step several times
the baseline's, and the split would leave a core idle for most of the run).

The distillation run keeps its half of the threads to its end, also where the baseline ends
first: a thread count changes float roundings (PyTorch's AVX2 kernels sum differently on one
and two threads), and a run that took the threads back at an epoch set by the machine's load
did not repeat itself: its weights, and the pruned student's top-1 two stages later, moved
between two runs of one pipeline (benchmarks/README.md, twenty-first session). It costs the
epoch or two the baseline may finish ahead, run on one core instead of two."""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn as nn

from . import dist
from .data import Data
from .errors import EdgekdError
from .inference import keep_logits, kept_logits

log = logging.getLogger("edgekd")
SEND_AT_MOST = 1 << 30  # bytes of in-RAM images the child may be sent a copy of


def pays(device: torch.device, objective, cfg, data: Data) -> bool:
    """Whether the baseline goes beside the distillation run `cfg` with `objective` (see above)."""
    return (device.type == "cpu" and dist.world().size == 1 and torch.get_num_threads() >= 2 and cfg.compile == "off"
            and all(src.table is not None for src in objective.teachers.values()) and in_ram_bytes(data) <= SEND_AT_MOST)


def in_ram_bytes(data: Data) -> int:
    """Bytes of the splits' images held in RAM (a memory-mapped split is mapped, not sent)."""
    storages = {}
    for split in (data.train, data.test, data.val):
        for t in (split.images, split.stored) if split is not None else ():
            if isinstance(t, torch.Tensor):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


class BaselineBeside:
    """The baseline's training in a child process for the duration of a `with` block: the block
    (the distillation run) has half the threads to its end, the child the other half; `result()` waits for
    the child and loads its weights into the model it was given. A failure here stops the child;
    a failure there is raised here as one line."""

    def __init__(self, model: nn.Module, data: Data, cfg, seed: int, state_path: Path, desc: str):
        self.model, self.desc = model, desc
        self.threads = torch.get_num_threads()
        payload = io.BytesIO()
        torch.save((model, data, cfg), payload)  # a pickle of this process's own objects, read by its own child
        self._args = (payload.getvalue(), seed, state_path, desc, self.threads // 2)
        self._proc = self._conn = None

    def __enter__(self) -> "BaselineBeside":
        mp = multiprocessing.get_context("spawn")
        self._conn, child_end = mp.Pipe(duplex=False)
        self._proc = mp.Process(target=_train, args=(child_end, *self._args), name=self.desc, daemon=True)
        self._proc.start()
        child_end.close()
        torch.set_num_threads(self.threads - self.threads // 2)
        log.info("%s: training beside this run in process %d (%d of %d threads each side)", self.desc, self._proc.pid,
                 self.threads // 2, self.threads)
        return self

    def result(self) -> list[dict]:
        """Wait for the child; its weights go into the model, its history is returned."""
        try:
            kind, *payload = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise EdgekdError(f"{self.desc}: its training process (beside the distillation run) died with exit code "
                              f"{self._proc.exitcode} (out of memory?)") from None
        self._proc.join()
        if kind == "error":
            error_type, message = payload
            raise error_type(message)
        state, history, last = payload
        self.model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
        keep_logits(last)  # its last evaluation, of these weights: the stage measures them without a pass
        return history

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.threads)
        if self._proc.is_alive():  # this run failed or was interrupted: the baseline is no use alone
            self._proc.terminate()
            self._proc.join()
        self._conn.close()


def _train(conn, payload: bytes, seed: int, state_path: Path, desc: str, threads: int) -> None:
    """The child: the same fit() as the distill stage's own baseline run, its result sent back
    as bytes (tensors pickled by multiprocessing would go through shared memory, and would have
    to outlive this process)."""
    from .train import fit

    _die_with_parent()
    # its epochs are logged, one line each, and its progress bars go nowhere: two processes'
    # bars on one terminal line overwrite each other
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    sys.stderr = open(os.devnull, "w")
    torch.set_num_threads(threads)
    model, data, cfg = torch.load(io.BytesIO(payload), weights_only=False)

    def progress(rec: dict) -> None:
        top1 = next((f", {k} {v}" for k, v in rec.items() if k.endswith("_top1") and not k.startswith("train_")), "")
        log.info("%s: epoch %d/%d, loss %.4f%s", desc, rec["epoch"], cfg.epochs, rec["loss"], top1)

    try:
        torch.manual_seed(seed)
        history = fit(model, data, cfg, torch.device("cpu"), seed=seed, state_path=state_path, desc=desc,
                      on_epoch=progress)
        state = io.BytesIO()
        torch.save(model.state_dict(), state)
        conn.send(("done", state.getvalue(), history, kept_logits()))
    except BaseException as e:  # as the same run here would raise it; anything else named in one line
        if isinstance(e, EdgekdError):
            conn.send(("error", type(e), str(e)))
        else:
            conn.send(("error", EdgekdError, f"{desc}: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"))
    finally:
        conn.close()


def _die_with_parent() -> None:
    """Linux: a parent killed outright (SIGKILL, out of memory) takes this child with it rather
    than leaving it training and writing checkpoints for a run that is gone."""
    with contextlib.suppress(OSError, AttributeError):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the line above
        os._exit(1)
