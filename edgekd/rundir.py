"""Claiming a run directory: never a folder of the user's own files, one writer at a time, and
nothing deleted when a resume redoes a stage.

Run directories are shared between teammates and CI jobs, so a second run on the same `--out`
must stop at once instead of interleaving its files with the first's; the lock is an flock on
`.edgekd.lock` (released by the kernel when the holder dies, so a killed run never leaves the
folder locked), holding the holder's pid for the message.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from .errors import InputError, first_few

LOCK = ".edgekd.lock"
REPLACED = "replaced"  # where a resume moves the outputs of stages it redoes


def _entries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name != LOCK)


class RunDirLock:
    """An exclusive, non-blocking claim on `run_dir` for this process (see the module doc)."""

    def __init__(self, run_dir: Path, resume: bool):
        self.run_dir, self.fd = run_dir, None
        if run_dir.exists() and not run_dir.is_dir():
            raise InputError(f"{run_dir}: is a file; --out expects a folder (new, empty, or an edgekd run to --resume)")
        if (run_dir / LOCK).exists():
            self._lock()  # a run in progress is named as such, before its files are judged
        has_manifest = (run_dir / "manifest.json").exists()
        if resume and not has_manifest:
            self.release()
            raise InputError(f"--resume {run_dir}: not a run directory (no manifest.json)")
        if not resume and run_dir.is_dir():
            self._refuse_existing(run_dir, has_manifest)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{run_dir}: cannot create it ({e.strerror}); choose another --out") from None
        if self.fd is None:
            self._lock()
        if not resume:  # another run may have finished here between the check above and the lock
            self._refuse_existing(run_dir, (run_dir / "manifest.json").exists())

    def _lock(self) -> None:
        try:
            self.fd = os.open(self.run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise InputError(f"{self.run_dir}: cannot write there ({e.strerror}); choose another --out") from None
        try:
            import fcntl
        except ImportError:  # no flock (Windows): a single writer is the user's to ensure
            return
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            self.release()
            raise InputError(f"{self.run_dir}: in use by another edgekd run (pid {holder}); wait for it to finish "
                             "or choose another --out") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def _refuse_existing(self, run_dir: Path, has_manifest: bool) -> None:
        if has_manifest:
            self.release()
            raise InputError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
        if (found := _entries(run_dir)):
            self.release()
            raise InputError(f"{run_dir}: exists and holds files edgekd did not write ({first_few(found)}); --out must be a new "
                             "or empty folder")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def set_aside(run_dir: Path, stage_dir: Path) -> Path:
    """Move a stage's folder to replaced/<name>-<time>/ (a resume redoes it): what it held,
    the user's own files included, stays on disk."""
    dest_root = run_dir / REPLACED
    dest_root.mkdir(exist_ok=True)
    dest = dest_root / f"{stage_dir.name}-{datetime.now():%Y%m%d-%H%M%S}"
    n = 1
    while dest.exists():
        dest, n = dest_root / f"{stage_dir.name}-{datetime.now():%Y%m%d-%H%M%S}-{n}", n + 1
    os.replace(stage_dir, dest)
    return dest


def read_json(path: Path, what: str) -> dict:
    """A run file as a dict; InputError naming it where it is truncated or not edgekd's shape."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); it was cut short or edited by hand") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: not an edgekd {what} (expected a JSON object, got {type(obj).__name__})")
    return obj


def read_manifest(run_dir: Path) -> dict:
    """The manifest of a run to resume, with its stage list checked for the fields resume reads."""
    path = run_dir / "manifest.json"
    m = read_json(path, "manifest")
    stages = m.get("stages", [])
    ok = isinstance(stages, list) and all(
        isinstance(s, dict) and isinstance(s.get("index"), int) and isinstance(s.get("status"), str)
        and isinstance(s.get("chain_hash", ""), str) and isinstance(s.get("artifacts", {}), dict)
        and all(isinstance(a, dict) and isinstance(a.get("path"), str) for a in s.get("artifacts", {}).values())
        for s in stages)
    if not ok:
        raise InputError(f"{path}: not an edgekd manifest (its 'stages' list lacks index/status/artifacts of the "
                         "expected types); it was edited by hand or by another tool")
    return m
