"""Opening checkpoint files without running code from them.

A pickle can name any Python callable and have the unpickler call it, so a downloaded
`.pt` file can run a shell command the moment it is loaded with `weights_only=False`.
edgekd loads every checkpoint with `torch.load(weights_only=True)` (tensors and plain
containers only) or as TorchScript; a file that needs full unpickling is refused *before*
anything from it runs, naming the Python globals it would import, unless the user opts in
with `<role>.trust_pickle: true`. The globals are read by walking the pickle's opcodes
(pickletools), which never executes them.
"""

from __future__ import annotations

import logging
import pickletools
from collections import deque
import warnings
import zipfile
from pathlib import Path
from typing import Any

from .errors import InputError, first_few

log = logging.getLogger("edgekd")
MAX_PICKLES = 6  # a legacy torch.save stream is magic, protocol, sys info, object, storage keys


def is_torchscript(path: Path) -> bool:
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _stream_globals(f) -> list[str] | None:
    """Globals imported by the consecutive pickles in `f`; None if `f` does not start with one."""
    found: list[str] = []
    for i in range(MAX_PICKLES):
        strings: deque[str] = deque(maxlen=2)  # STACK_GLOBAL takes the last two pushed
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception:  # not (or no longer) a pickle: raw storage bytes follow, or garbage
            return found if i else None
    return found


def pickle_globals(path: Path, is_zip: bool) -> list[str] | None:
    """The Python globals a checkpoint's pickle would import, without importing any."""
    if is_zip:
        with zipfile.ZipFile(path) as z:
            pkl = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if pkl is None:
                return None
            with z.open(pkl) as f:
                return _stream_globals(f)
    with open(path, "rb") as f:
        return _stream_globals(f)


def _unsafe(path: Path, is_zip: bool, names: list[str]) -> list[str]:
    """The globals torch's weights-only unpickler refuses (torch's own list where it has one),
    those outside torch and torchvision first: that is where a payload shows."""
    import torch

    unsafe = names
    if is_zip:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path) or names
        except Exception:
            pass
    else:
        try:
            from torch._weights_only_unpickler import _get_allowed_globals  # private; legacy files only

            unsafe = [n for n in names if n not in set(_get_allowed_globals())] or names
        except ImportError:
            pass
    return sorted(set(unsafe), key=lambda n: (n.startswith(("torch.", "torchvision.")), n))


def open_checkpoint(path: Path, where: str, trust_pickle: bool, trust_key: str, mmap: bool = False) -> tuple[str, Any]:
    """("torchscript", None) or ("object", the loaded object). Raises InputError for a file
    that needs unpickling (unless trust_pickle) or that is not a readable PyTorch file."""
    import torch

    is_zip = zipfile.is_zipfile(path)
    if is_zip and is_torchscript(path):
        return "torchscript", None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a plain pickle
            warnings.simplefilter("ignore")
            return "object", torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as first:
        reason = f"{type(first).__name__}"
    names = pickle_globals(path, is_zip)
    if not names:
        raise InputError(f"{where}: cannot read checkpoint (corrupt or not a PyTorch file: {reason})")
    if not trust_pickle:
        raise InputError(f"{where}: refused: loading it would unpickle {first_few(_unsafe(path, is_zip, names))}, "
                         "which runs code from the file; re-save it as a state_dict (torch.save(model.state_dict(), "
                         f"path)) or set {trust_key}: true if you trust its source")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise InputError(f"{where}: cannot read checkpoint (corrupt or not a PyTorch file: {type(e).__name__})") from None
    log.warning("%s: unpickled with %s: true (this ran code from the file)", where, trust_key)
    return "object", obj
