"""Inference runtimes the benchmark can drive. Each loads a model file of its format (ONNX, an
ExecuTorch .pte or a LiteRT .tflite) with a pinned thread count and returns a function from a float32 NCHW
batch to logits. A runtime that is not installed is reported as unavailable (one line),
never as a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import EdgekdError
from ..registry import Registry, why_missing

RUNTIMES: Registry = Registry("runtime")
Runner = Callable[[np.ndarray], np.ndarray]


class Runtime:
    module: str = ""
    install_hint: str = ""
    fmt: str = "onnx"  # the file format it runs: the artifact prefix and the file suffix
    also: tuple[str, ...] = ()  # formats it also runs, where a variant has no `fmt` file
    batched: bool = True  # whether one call runs a whole batch

    @classmethod
    def available(cls) -> str | None:
        """None when usable, otherwise why not."""
        return why_missing(cls.module, cls.install_hint)

    @classmethod
    def version(cls) -> str:
        return getattr(__import__(cls.module), "__version__", "?")

    def preload(self) -> None:
        """Import what `load` needs, so that memory measured after this is the model's."""
        __import__(self.module)

    def load(self, path: Path, threads: int) -> Runner:
        raise NotImplementedError

    def op_profile(self, path: Path, x: np.ndarray) -> dict[str, dict] | None:
        """Microseconds per image by kind of op (quant.plan.op_kind's words), from the runtime's own
        profiler, 1 thread, batch 1 (`x[:1]`): {kind: {"nodes", "us"}}, slowest first, so that an
        int8 file can be set against its fp32 file op for op (quant.plan.kind_comparison); None
        where the runtime has no per-operator profiler."""
        return None


def ort_session(path: Path, threads: int = 1, int8_kernels: bool = True):
    """A CPU session with pinned intra-op threads (0 = onnxruntime's default); imports no torch.

    `int8_kernels=False` turns graph optimizations off: Q/DQ pairs then run as plain float
    math instead of being fused into int8 kernels, which is the reference arithmetic of a
    QDQ file whatever this CPU's kernels do (quant.targets)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if int8_kernels
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise EdgekdError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0][:300]})") from None


@RUNTIMES.register("onnxruntime")
class OnnxRuntime(Runtime):
    module, install_hint = "onnxruntime", "pip install onnxruntime"

    def op_profile(self, path: Path, x: np.ndarray) -> dict[str, dict]:
        from ..quant.plan import profiles

        return profiles(path, x[:1])[1]

    def load(self, path: Path, threads: int) -> Runner:
        sess = ort_session(path, threads)
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]


@RUNTIMES.register("openvino")
class OpenVINO(Runtime):
    """OpenVINO reads ONNX directly and runs QDQ graphs with its int8 kernels: a run's int8 files
    planned for it (formats.openvino), and the ONNX format's files of the other variants.

    Its CPU plugin silently runs fp32 models in bf16 where the CPU has bf16 units (this VM
    does: 0.59x ORT's fp32 time); f32 is pinned so an "fp32" row means fp32 and its accuracy
    matches the file's."""

    module, install_hint, fmt, also = "openvino", "pip install 'edgekd[mobile]'", "openvino", ("onnx",)

    @staticmethod
    def compile(path: Path, threads: int, profile: bool = False):
        """The file compiled for this machine's CPU as every edgekd run does (f32 pinned);
        `profile`: with OpenVINO's per-node counters on (op_profile)."""
        import openvino as ov

        return ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": profile})

    def load(self, path: Path, threads: int) -> Runner:
        compiled = self.compile(path, threads)
        req = compiled.create_infer_request()
        out = compiled.outputs[0]

        def run(x: np.ndarray) -> np.ndarray:
            req.infer({0: x})
            return req.get_tensor(out).data.copy()

        return run

    def op_profile(self, path: Path, x: np.ndarray, runs: int = 200) -> dict[str, dict]:
        """From OpenVINO's per-node counters (which hold the last inference's times, in
        microseconds): means over `runs` after a warm-up, nodes by openvino_kind."""
        from ..quant.plan import kind_table

        warmup = 10
        req = self.compile(path, 1, profile=True).create_infer_request()
        samples = []
        for i in range(warmup + runs):
            req.infer({0: x[:1]})
            if i >= warmup:
                samples += [(openvino_kind(node.node_type, node.exec_type), node.node_name,
                             node.real_time.total_seconds() * 1e6 / runs)
                            for node in req.get_profiling_info() if node.status == node.Status.EXECUTED]
        return kind_table(samples)


# OpenVINO CPU node type -> kind of op, in quant.plan.op_kind's words (convolutions by openvino_kind)
OPENVINO_KINDS = {"GroupConvolution": "depthwise conv", "FullyConnected": "dense", "MatMul": "dense", "Add": "add",
                  "Eltwise": "add", "ReduceMean": "pool", "Pooling": "pool", "Reorder": "layout change",
                  "Transpose": "layout change", "Convert": "quantize / dequantize", "FakeQuantize": "quantize / dequantize"}


def openvino_kind(node_type: str, exec_type: str) -> str:
    """What a node of OpenVINO's compiled CPU graph computes, from its profiling record: the node
    type ("GroupConvolution", "FullyConnectedQuantizedLegacy") and, for a convolution, whether
    the kernel it runs is a 1x1 one (exec types such as "jit_avx2_1x1_I8", "brgconv_avx512_1x1_f32")."""
    if node_type == "Convolution":
        return "1x1 conv" if "1x1" in exec_type else "conv"
    base = next((k for k in OPENVINO_KINDS if node_type.startswith(k)), None)
    return OPENVINO_KINDS[base] if base else node_type.lower()


@RUNTIMES.register("executorch")
class ExecuTorch(Runtime):
    """ExecuTorch with the XNNPACK delegate (what PyTorch ships to Android/iOS), on .pte programs
    written by the export stage; batch-1 programs, so larger batches run image by image."""

    module, install_hint, fmt, batched = "executorch", "pip install 'edgekd[mobile]'", "pte", False

    @classmethod
    def version(cls) -> str:
        from importlib.metadata import version

        return version("executorch")

    def preload(self) -> None:
        import executorch.runtime  # noqa: F401  (pulls in torch)

    def load(self, path: Path, threads: int) -> Runner:
        from ..pte_export import pte_runner

        return pte_runner(path, threads)

    def op_profile(self, path: Path, x: np.ndarray) -> dict[str, dict]:
        from ..pte_export import pte_op_profile

        return pte_op_profile(path, x)


@RUNTIMES.register("litert")
class LiteRT(Runtime):
    """LiteRT (TensorFlow Lite) Interpreter with its default XNNPACK CPU delegate, on .tflite
    files (what Android apps ship); our files have a batch of 1, so batches run image by image."""

    module, install_hint, fmt, batched = "ai_edge_litert", "pip install 'edgekd[litert]'", "tflite", False

    @classmethod
    def version(cls) -> str:
        from importlib.metadata import version

        return version("ai-edge-litert")

    def preload(self) -> None:
        import ai_edge_litert.interpreter  # noqa: F401  (no torch)

    def load(self, path: Path, threads: int) -> Runner:
        from ..litert_export import tflite_runner

        return tflite_runner(path, threads)


def resolve(names: str | list[str]) -> list[str]:
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if names == ["all"]:
        return RUNTIMES.names()
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise EdgekdError(f"unknown runtime '{unknown[0]}'; known: {', '.join(RUNTIMES.names())}")
    return names
