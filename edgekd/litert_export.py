"""LiteRT (TensorFlow Lite) export (.tflite) for Android apps and Linux boards, fp32 and int8.

fp32 is litert-torch's conversion of the student. int8 is litert-torch's own PT2E quantizer
(per-channel symmetric int8 weights, int8 activations from HistogramObserver on the calibration
images), lowered by its STATIC Q/DQ conversion into integer kernels. That conversion makes the
file's input and output int8 tensors; a CPU app feeds float, so by default a QUANTIZE op is put
in front of the input and a DEQUANTIZE op behind the output (LiteRT's converter does the same
for Keras models; litert-torch 0.10 has no switch for it). `integer_io` keeps the int8
interface for NPUs and microcontrollers, and the metadata then carries the scale and zero point.

Metadata lives in the file: one entry of the flatbuffer's `metadata` table per `edgekd.*` key,
the value a UTF-8 string in its buffer, readable with any flatbuffers reader of the TFLite
schema (`ai_edge_litert.schema_py_generated`). Programs have a static batch of 1."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EdgekdError
from .fileio import atomic_path
from .native_logs import quiet_native_output

META_PREFIX = "edgekd."


def export_tflite(model, path: Path, image_size: int, calib: np.ndarray | None = None,
                  integer_io: bool = False, keep_fp32: list[str] = ()) -> Path:
    """Convert `model` to a .tflite; int8 (litert-torch PT2E) when calibration images are given,
    except in the modules named in `keep_fp32` (module paths)."""
    import litert_torch
    import torch

    litert_torch.config.show_progress = False
    model = model.eval().cpu()
    example = (torch.zeros(1, 3, image_size, image_size),)
    with torch.no_grad(), quiet_native_output(stdout=True):
        if calib is None:
            edge = litert_torch.convert(model, example)
        else:
            from litert_torch.quantize import pt2e_quantizer as pq
            from litert_torch.quantize.quant_config import QuantConfig
            from torchao.quantization.pt2e import allow_exported_model_train_eval
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

            quantizer = pq.PT2EQuantizer().set_global(pq.get_symmetric_quantization_config(is_per_channel=True))
            with _leave_float(quantizer, keep_fp32):
                prepared = prepare_pt2e(torch.export.export(model, example).module(), quantizer)
            for img in torch.from_numpy(calib).split(1):  # the program's batch is 1
                prepared(img)
            quantized = convert_pt2e(prepared, fold_quantize=False)
            allow_exported_model_train_eval(quantized)
            quantized.eval()  # swaps the graph's training ops and sets `training`, which litert-torch checks
            edge = litert_torch.convert(quantized, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        buf = edge.model_content()
    if calib is not None and not integer_io:
        buf = float_interface(buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf)
    return path


@contextmanager
def _leave_float(quantizer, paths: list[str]):
    """While preparing: the nodes of the modules at `paths` get no annotation, so they stay
    float. litert-torch's own per-module setting cannot say it as released: set_module_name
    refuses None (its annotator skips a None config), and its module-name filter expects the
    `L__self___` keys older torch.export graphs had, so the filter is swapped for one that reads
    the module paths (quant.plan.in_modules) for the duration."""
    if not paths:
        yield
        return
    from litert_torch.quantize import pt2e_quantizer as pq

    from .quant.plan import in_modules

    for name in paths:
        quantizer.module_name_config[name] = None
    original = pq._get_module_name_filter
    pq._get_module_name_filter = lambda name: (lambda node: in_modules(node, [name]))
    try:
        yield
    finally:
        pq._get_module_name_filter = original


def _opcode(model, builtin: int, version: int) -> int:
    """Index of the operator code `builtin` in `model`, added if missing."""
    from ai_edge_litert import schema_py_generated as fb

    for i, oc in enumerate(model.operatorCodes):
        if max(oc.builtinCode, oc.deprecatedBuiltinCode) == builtin:
            oc.version = max(oc.version, version)
            return i
    oc = fb.OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = builtin, min(builtin, 127), version
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def float_interface(buf: bytes) -> bytes:
    """The same int8 program with float32 input and output: each int8 input gets a QUANTIZE
    from a new float tensor, each int8 output a DEQUANTIZE into one (signature updated)."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model_from_bytearray(bytearray(buf))
    sg = model.subgraphs[0]
    q_op = _opcode(model, fb.BuiltinOperator.QUANTIZE, 2)
    dq_op = _opcode(model, fb.BuiltinOperator.DEQUANTIZE, 2)

    def float_twin(i: int, suffix: str) -> int:
        t = sg.tensors[i]
        f = fb.TensorT()
        f.shape, f.shapeSignature, f.type = t.shape, t.shapeSignature, fb.TensorType.FLOAT32
        f.name = (t.name or b"") + suffix.encode()
        empty = fb.BufferT()
        model.buffers.append(empty)
        f.buffer = len(model.buffers) - 1
        sg.tensors.append(f)
        return len(sg.tensors) - 1

    def op(code: int, src: int, dst: int):
        o = fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, [src], [dst]
        return o

    renamed = {}
    for k, i in enumerate(list(sg.inputs)):
        if sg.tensors[i].type == fb.TensorType.INT8:
            f = float_twin(i, "_float")
            sg.operators.insert(0, op(q_op, f, i))
            sg.inputs[k] = renamed[i] = f
    for k, i in enumerate(list(sg.outputs)):
        if sg.tensors[i].type == fb.TensorType.INT8:
            f = float_twin(i, "_float")
            sg.operators.append(op(dq_op, i, f))
            sg.outputs[k] = renamed[i] = f
    for sig in model.signatureDefs or []:
        for m in (sig.inputs or []) + (sig.outputs or []):
            m.tensorIndex = renamed.get(m.tensorIndex, m.tensorIndex)
    return bytes(fu.convert_object_to_bytearray(model))


def _interface_quantization(model) -> dict[str, str]:
    """Metadata naming the scale and zero point of an integer input/output (none for float I/O),
    read from the already parsed model's interface tensors."""
    import json

    from ai_edge_litert import schema_py_generated as fb

    names = {fb.TensorType.INT8: "int8", fb.TensorType.UINT8: "uint8"}
    sg, out = model.subgraphs[0], {}
    for role, index in (("input", sg.inputs[0]), ("output", sg.outputs[0])):
        t = sg.tensors[index]
        if t.type in names:
            out[f"{META_PREFIX}{role}_quantization"] = json.dumps(
                {"dtype": names[t.type], "scale": float(t.quantization.scale[0]),
                 "zero_point": int(t.quantization.zeroPoint[0])})
    return out


def read_metadata(path: Path) -> dict[str, str]:
    """The file's `edgekd.*` metadata entries (see the module docstring)."""
    from ai_edge_litert import schema_py_generated as fb

    buf = Path(path).read_bytes()
    try:
        model = fb.Model.GetRootAs(buf, 0)
        out = {}
        for i in range(model.MetadataLength()):
            md = model.Metadata(i)
            name = (md.Name() or b"").decode()
            if name.startswith(META_PREFIX):
                b = model.Buffers(md.Buffer())
                raw = buf[b.Offset():b.Offset() + b.Size()] if b.Offset() > 1 else b.DataAsNumpy().tobytes()
                out[name] = bytes(raw).decode()
        return out
    except Exception as e:
        raise EdgekdError(f"{path}: not a readable .tflite file ({type(e).__name__})") from None


def write_metadata(path: Path, props: dict[str, str]) -> None:
    """Add or replace `edgekd.*` metadata entries in the file (atomically), with the scale and
    zero point of an integer interface; a replaced entry keeps its buffer, which gets the new value."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils as fu

    model = fu.read_model_from_bytearray(bytearray(Path(path).read_bytes()))
    model.metadata = model.metadata or []
    by_name = {(m.name or b"").decode(): m for m in model.metadata}
    for key, value in {**props, **_interface_quantization(model)}.items():
        if key in by_name:
            model.buffers[by_name[key].buffer].data = np.frombuffer(value.encode(), np.uint8)
            continue
        buf = fb.BufferT()
        buf.data = np.frombuffer(value.encode(), np.uint8)
        model.buffers.append(buf)
        m = fb.MetadataT()
        m.name, m.buffer = key.encode(), len(model.buffers) - 1
        model.metadata.append(m)
    with atomic_path(path) as tmp:
        tmp.write_bytes(bytes(fu.convert_object_to_bytearray(model)))


def tflite_runner(path: Path, threads: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """float32 NCHW batch -> float logits through LiteRT's Interpreter (XNNPACK delegate, the
    default CPU path), in chunks of the file's batch. Integer interfaces are quantized and
    dequantized with the tensors' own scale and zero point; an NHWC file gets the batch
    transposed. Imports no torch."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        with quiet_native_output():  # "Created TensorFlow Lite XNNPACK delegate" on every load
            it = Interpreter(model_path=str(path), num_threads=threads or None)
            it.allocate_tensors()
    except Exception as e:
        raise EdgekdError(f"{path}: LiteRT cannot load it ({str(e).splitlines()[0][:300] if str(e) else type(e).__name__})") \
            from None
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    shape = tuple(int(s) for s in inp["shape"])
    nhwc = len(shape) == 4 and shape[3] == 3 and shape[1] != 3
    batch = shape[0]

    def to_input(x: np.ndarray) -> np.ndarray:
        if nhwc:
            x = x.transpose(0, 2, 3, 1)
        dt = np.dtype(inp["dtype"])
        if dt.kind in "iu":
            scale, zero = inp["quantization"]
            info = np.iinfo(dt)
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dt)
        return np.ascontiguousarray(x, dtype=dt)

    def from_output(y: np.ndarray) -> np.ndarray:
        if np.dtype(out["dtype"]).kind in "iu":
            scale, zero = out["quantization"]
            return (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32, copy=True)

    def run(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        res = []
        for i in range(0, len(x), batch):
            chunk = x[i:i + batch]
            n = len(chunk)
            if n < batch:  # a static batch: pad the last chunk, keep its rows
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            it.set_tensor(inp["index"], to_input(chunk))
            it.invoke()
            res.append(from_output(it.get_tensor(out["index"]))[:n])
        return np.concatenate(res).reshape(len(x), -1)

    return run


def input_shape(path: Path) -> list[int]:
    from ai_edge_litert import schema_py_generated as fb

    buf = Path(path).read_bytes()
    try:
        sg = fb.Model.GetRootAs(buf, 0).Subgraphs(0)
        return [int(v) for v in sg.Tensors(sg.Inputs(0)).ShapeAsNumpy()]
    except Exception as e:
        raise EdgekdError(f"{path}: not a readable .tflite file ({type(e).__name__})") from None
