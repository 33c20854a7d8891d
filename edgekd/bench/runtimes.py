"""Inference runtimes the benchmark can drive. Each loads an ONNX file with a pinned thread
count and returns a function from a float32 NCHW batch to logits. A runtime that is not
installed is reported as unavailable (one line), never as a traceback."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np

from ..registry import Registry

RUNTIMES: Registry = Registry("runtime")
Runner = Callable[[np.ndarray], np.ndarray]


class Runtime:
    module: str = ""
    install_hint: str = ""

    @classmethod
    def available(cls) -> str | None:
        """None when usable, otherwise why not."""
        if importlib.util.find_spec(cls.module) is None:
            return f"not installed ({cls.install_hint})"
        return None

    @classmethod
    def version(cls) -> str:
        return getattr(__import__(cls.module), "__version__", "?")

    def load(self, path: Path, threads: int) -> Runner:
        raise NotImplementedError


@RUNTIMES.register("onnxruntime")
class OnnxRuntime(Runtime):
    module, install_hint = "onnxruntime", "pip install onnxruntime"

    def load(self, path: Path, threads: int) -> Runner:
        from ..onnx_export import session

        sess = session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]


@RUNTIMES.register("openvino")
class OpenVINO(Runtime):
    """OpenVINO reads ONNX directly and runs QDQ graphs with its int8 kernels.

    Its CPU plugin silently runs fp32 models in bf16 where the CPU has bf16 units (this VM
    does: 0.59x ORT's fp32 time); f32 is pinned so an "fp32" row means fp32 and its accuracy
    matches the file's."""

    module, install_hint = "openvino", "pip install 'edgekd[mobile]'"

    def load(self, path: Path, threads: int) -> Runner:
        import openvino as ov

        core = ov.Core()
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                       "INFERENCE_PRECISION_HINT": "f32"})
        req = compiled.create_infer_request()
        out = compiled.outputs[0]

        def run(x: np.ndarray) -> np.ndarray:
            req.infer({0: x})
            return req.get_tensor(out).data.copy()

        return run


def resolve(names: str | list[str]) -> list[str]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names == ["all"]:
        return RUNTIMES.names()
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        from ..errors import EdgekdError

        raise EdgekdError(f"unknown runtime '{unknown[0]}'; known: {', '.join(RUNTIMES.names())}")
    return names
