"""Atomic file writes and content hashing.

Every artifact is written to a temporary file in the same folder and renamed into
place, so a killed process never leaves a half-written checkpoint or report behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success.

    The temporary file is created private (0600, mkstemp's default); before it takes the final
    name it gets the mode a plain open() would have given it (0666 less the umask), so an
    artifact is as readable by a web server or a teammate as the user's other files."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_failed(path, e.strerror or str(e)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError from its zip writer
        if isinstance(e, RuntimeError) and "write" not in str(e) and "inline_container" not in str(e):
            raise
        tmp_path.unlink(missing_ok=True)  # before the free space is measured
        raise _write_failed(path, getattr(e, "strerror", None) or str(e).splitlines()[0][:200]) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _write_failed(path: Path, why: str):
    from .errors import EdgekdError

    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free there"
    except OSError:
        free = "free space unknown"
    return EdgekdError(f"{path}: cannot write it ({why}; {free}); free space and run again (--resume continues a run where it stopped)")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    import torch

    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # our handle: closed (its space freed) even when a write fails
        torch.save(obj, f)


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=_json_default).encode()).hexdigest()


def file_size(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size
