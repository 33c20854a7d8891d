"""ExecuTorch export (.pte, XNNPACK delegate) for phones and boards, fp32 and int8.

int8 uses ExecuTorch's own PT2E flow (XNNPACKQuantizer: per-channel symmetric int8 weights,
int8 activations calibrated on training images), because XNNPACK cannot run onnxruntime's QDQ
files. Programs have a static batch of 1, which is what an app runs; ExecuTorch 1.5's memory
planner sized dynamic-batch programs below their declared bound here ("Attempted to resize a
bounded tensor"), so batches are fed image by image. Each .pte gets a `.pte.json` sidecar with
the same preprocessing metadata the ONNX files carry."""

from __future__ import annotations

import json
import logging
import re
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from .errors import EdgekdError
from .fileio import atomic_path, write_json
from .native_logs import quiet_native_output
from .quant.plan import in_modules, kind_table

log = logging.getLogger("edgekd")


def export_pte(model: nn.Module, path: Path, image_size: int, calib: np.ndarray | None = None,
               keep_fp32: list[str] = ()) -> Path:
    """Lower `model` to an XNNPACK-delegated .pte; int8 (PT2E) when calibration images are given,
    except in the modules named in `keep_fp32` (module paths)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    model = model.eval().cpu()
    example = (torch.zeros(1, 3, image_size, image_size),)
    with torch.no_grad():
        if calib is not None:
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                                 get_symmetric_quantization_config)
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            if keep_fp32:  # XNNPACKQuantizer takes no per-module "none"; its node filter does the same
                quantizer.set_filter_function(lambda node: not in_modules(node, keep_fp32))
            prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
            for img in torch.from_numpy(calib).split(1):  # the program's batch is 1
                prepared(img)
            model = convert_pt2e(prepared)
        program = to_edge_transform_and_lower(torch.export.export(model, example),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
    with atomic_path(path) as tmp:
        tmp.write_bytes(program.buffer)
    return path


def write_sidecar(path: Path, props: dict[str, str]) -> None:
    write_json(Path(f"{path}.json"), props)


def read_sidecar(path: Path) -> dict[str, str]:
    side = Path(f"{path}.json")
    if not side.is_file():
        return {}
    try:
        return json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise EdgekdError(f"{side}: unreadable metadata sidecar ({type(e).__name__})") from None


def pte_runner(path: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    """float32 NCHW batch -> logits, one image at a time through the program's `forward`."""
    with open(path, "rb") as f:
        if f.read(8)[4:6] != b"ET":  # flatbuffer file identifier "ETxx"
            raise EdgekdError(f"{path}: not an ExecuTorch program (no ET file identifier)")
    with quiet_native_output():
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime

        portable_lib._unsafe_reset_threadpool(threads)  # process-wide XNNPACK pool
        try:
            method = Runtime.get().load_program(str(path)).load_method("forward")
        except Exception as e:
            method = None
            why = type(e).__name__
    if method is None:
        raise EdgekdError(f"{path}: not a loadable ExecuTorch program ({why})")

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return np.concatenate([method.execute([t[i : i + 1]])[0].numpy() for i in range(len(t))])

    return run


# XNNPACK operator (its profiler's event name, less the data types and the "#n") -> kind of op, in
# quant.plan.op_kind's words. ExecuTorch lowers a 1x1 convolution to a fully connected operator,
# as it does the classifier, so XNNPACK's time for the two cannot be told apart.
XNNPACK_KINDS = {"Fully Connected": "1x1 conv / dense", "Add": "add", "Multiply": "multiply", "Mean": "pool",
                 "Global Average Pooling": "pool", "Average Pooling": "pool", "Max Pooling": "pool",
                 "Transpose": "layout change", "Static Transpose": "layout change", "Copy": "layout change",
                 "Static Reshape": "layout change", "Convert": "quantize / dequantize"}
ENCLOSING = ("Method::execute", "DELEGATE_CALL", "OPERATOR_CALL")  # events that contain the operators' own


def xnnpack_kind(event: str, delegated: bool = True) -> str:
    """What an ExecuTorch profiler event computes: "Convolution (NHWC, QC8) DWConv #3" -> "depthwise
    conv" (XNNPACK names its fp32 and int8 kernels alike, data types in brackets); an op outside
    the XNNPACK delegate keeps its kernel's name ("native_call__to_dim_order_copy.out" ->
    "outside XNNPACK: _to_dim_order_copy")."""
    op = re.sub(r" #\d+$", "", event)
    if not delegated:
        return f"outside XNNPACK: {re.sub(r'^native_call_|[.]out$', '', op)}"
    base = op.split(" (")[0]
    if base == "Convolution":
        return "depthwise conv" if op.endswith("DWConv") else "1x1 conv / dense" if op.endswith(" GEMM") else "conv"
    return XNNPACK_KINDS.get(base, base.lower())


def pte_op_profile(path: Path, x: np.ndarray, runs: int = 200, threads: int = 1) -> dict[str, dict]:
    """Microseconds per inference by kind of op (xnnpack_kind), from XNNPACK's own per-operator
    events in ExecuTorch's ETDump, read by ExecuTorch's Inspector (bench.runtimes.Runtime.op_profile
    for .pte programs), so the export stage can say which of XNNPACK's int8 kernels cost time
    where an int8 program does not pay (quant.plan.kind_comparison). Means over `runs` after a warm-up,
    1 image (`x[:1]`)."""
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    warmup = 10
    with quiet_native_output(), tempfile.TemporaryDirectory() as td, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Inspector's: no debug buffer, so no intermediate tensors (not asked for)
        portable_lib._unsafe_reset_threadpool(threads)  # process-wide XNNPACK pool, as pte_runner sets it
        program = Runtime.get().load_program(str(path), enable_etdump=True)
        method = program.load_method("forward")
        img = torch.from_numpy(np.ascontiguousarray(x[:1], dtype=np.float32))
        for _ in range(warmup + runs):
            method.execute([img])
        program.write_etdump_result_to_file(f"{td}/etdump", f"{td}/debug")  # no debug buffer: not written
        blocks = Inspector(etdump_path=f"{td}/etdump").event_blocks
    events = [e for b in blocks if b.name == "Execute" for e in b.events
              if e.name not in ENCLOSING and e.perf_data is not None]
    # an operator outside XNNPACK has its kernel's name, the same for each call: the event's place tells them apart
    return kind_table((xnnpack_kind(e.name, e.is_delegated_op), i, 1000.0 * float(np.mean(e.perf_data.raw[warmup:] or [0.0])))
                      for i, e in enumerate(events))  # ms -> us per inference
