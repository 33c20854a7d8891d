"""Silencing the native logs of mobile toolchains (ExecuTorch's runtime, litert-torch's
converter): they write progress and INFO lines to fd 2 and to Python's streams on every
load or conversion, which would bury the run's log and the CLI's one-line errors."""

from __future__ import annotations

import io
import logging
import os
import sys
from contextlib import ExitStack, contextmanager, redirect_stderr, redirect_stdout

# torchao (ExecuTorch's and litert-torch's quantizers) registers an Enum with torch's pytree on
# import; torch 2.14 warns about it on every run
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


@contextmanager
def quiet_native_output(stdout: bool = False):
    """fd 2 to /dev/null and sys.stderr (and sys.stdout if asked) to a discarded buffer."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null, ExitStack() as stack:
            stack.enter_context(redirect_stderr(io.StringIO()))
            if stdout:
                stack.enter_context(redirect_stdout(io.StringIO()))
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
