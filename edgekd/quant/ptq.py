"""Static int8 post-training quantization of an ONNX file with onnxruntime's quantizer."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import EdgekdError
from ..fileio import atomic_path
from .targets import TARGETS, Target

log = logging.getLogger("edgekd")


class _Reader:
    """onnxruntime CalibrationDataReader over a float32 NCHW array."""

    def __init__(self, x: np.ndarray, input_name: str, batch: int = 32):
        self.batches = [x[i : i + batch] for i in range(0, len(x), batch)]
        self.input_name = input_name
        self.i = 0

    def get_next(self):
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return {self.input_name: self.batches[self.i - 1]}

    def rewind(self):
        self.i = 0


def quantize_onnx(src: Path, dst: Path, calib: np.ndarray, method: str = "minmax", per_channel: bool = True,
                  activation_type: str = "uint8", percentile: float = 99.999, target: Target = TARGETS["portable"],
                  exclude_depthwise: bool = False, keep_first_conv_fp32: bool = False,
                  activation_ranges: dict[str, tuple[float, float]] | None = None, plan=None,
                  tensor_ranges: dict[str, tuple[float, float]] | None = None, calibration_cache: Path | None = None
                  ) -> Path:
    """QDQ int8: per-channel symmetric int8 weights on the target's grid (7-bit for `portable`,
    see quant.targets), per-tensor activations calibrated on `calib`. The target is stamped
    into the file's metadata, so verification and the device side know what it is for.

    `activation_ranges` maps a Conv/Gemm weight's initializer name to the (min, max) its input
    should be quantized with: QAT's learned ranges, so the file runs the activation grid the
    weights were trained under instead of re-calibrating it (calibration then only sets the
    tensors QAT does not simulate, such as residual-add outputs). `tensor_ranges` does the same by
    tensor name, for QAT that rounds every tensor the file does (quant.sites).

    `plan` (quant.plan.Plan) names the nodes that stay fp32; without one, `keep_first_conv_fp32`
    leaves the stem conv unquantized: with 3 input channels its int8 kernel gains little, and
    quantizing raw pixels costs accuracy (measured on the shared student: +0.04 points and
    ~5-8 % faster end to end than quantizing it).

    `calibration_cache` (a folder) keeps the activation ranges onnxruntime measured, one file per
    set of op types calibrated, so that files quantized again from the same `src` and `calib`
    (a plan search's candidates) skip calibration and get the same ranges: the caller gives one
    folder per (src, calib, method)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    extra = {"ActivationSymmetric": activation_type == "int8", "WeightSymmetric": True}
    if method == "percentile":
        extra["CalibPercentile"] = percentile
    with tempfile.TemporaryDirectory() as td:
        pre = Path(td) / "pre.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        except Exception as e:
            log.warning("quant_pre_process failed (%s); quantizing the raw export", e)
            pre = src
        import onnx

        graph = onnx.load(str(pre)).graph
        from .plan import WEIGHTED, rule_plan

        plan = plan or rule_plan(graph, keep_first_conv_fp32, [])
        nodes_to_exclude = list(plan.excluded_nodes(graph))
        if exclude_depthwise:
            nodes_to_exclude += [n.name for n in graph.node if n.op_type == "Conv" and _group(n) > 1]
        input_name = graph.input[0].name
        ranges = {**_input_ranges(graph, activation_ranges or {}), **(tensor_ranges or {})}
        overrides = {t: _override(lo, hi) for t, (lo, hi) in ranges.items()}
        if overrides:
            extra["TensorQuantOverrides"] = overrides
        weighted = [n.name for n in graph.node if n.op_type in WEIGHTED]
        if weighted and set(weighted) <= set(nodes_to_exclude) and not overrides:
            # a plan that keeps every layer fp32 (int8 did not pay): the file is the fp32 graph as
            # exported, not the quantizer's rewrite of it (whose decomposed activations some
            # runtimes no longer fuse)
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
            from ..onnx_export import set_metadata

            set_metadata(dst, {"edgekd.int8_target": target.name, "edgekd.weight_qmax": str(target.weight_qmax),
                               "edgekd.int8_layers": "0"})
            return dst
        op_types = None
        if plan.op_types_kept_fp32():
            from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

            op_types = sorted((set(QDQRegistry) | set(QLinearOpsRegistry)) - set(plan.op_types_kept_fp32()))
        cache = None
        if calibration_cache is not None:
            key = hashlib.sha256(",".join(op_types or ["all"]).encode()).hexdigest()[:12]
            cache = str(Path(calibration_cache) / f"ranges_{key}.json")
        with atomic_path(dst) as tmp:
            def quantize() -> None:
                # onnxruntime's histogram calibrators print their progress to stdout, between edgekd's bars
                with contextlib.redirect_stdout(io.StringIO()) as said:
                    quantize_static(
                        str(pre), str(tmp), _Reader(calib.astype(np.float32), input_name),
                        quant_format=QuantFormat.QDQ, per_channel=per_channel, reduce_range=target.reduce_range,
                        activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=methods[method],
                        nodes_to_exclude=nodes_to_exclude, op_types_to_quantize=op_types, extra_options=extra,
                        calibration_cache_path=cache,
                    )
                if said.getvalue().strip():
                    log.debug("onnxruntime quantize_static: %s", said.getvalue().strip())

            try:
                quantize()
                if refused := refused_pools(tmp):
                    # the pool's input on its output's grid: what the QAT model computes after a 1x1 pool
                    # (its range for the classifier's input clips the features), and scales the kernel takes
                    overrides = extra.setdefault("TensorQuantOverrides", {})
                    for name, (tensor, lo, hi) in refused.items():
                        overrides[tensor] = _override(lo, hi)
                    log.warning("int8 %s: the input of %s quantized on its output's range %s: onnxruntime's int8 "
                                "average pool refuses scales whose ratio over the pixels is outside [2^-32, 256)",
                                dst.name, ", ".join(refused), ", ".join(f"[{lo:.3g}, {hi:.3g}]" for _, lo, hi in refused.values()))
                    quantize()
            except Exception as e:
                raise EdgekdError(f"int8 quantization of {src.name} failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    from ..onnx_export import set_metadata

    set_metadata(dst, {"edgekd.int8_target": target.name, "edgekd.weight_qmax": str(target.weight_qmax)})
    return dst


POOL_SCALE = (2.0 ** -32, 256.0)  # onnxruntime's QLinearGlobalAveragePool: input scale / (output scale x pixels)


def refused_pools(path: Path) -> dict[str, tuple[str, float, float]]:
    """GlobalAveragePool nodes of a QDQ file that onnxruntime fuses into its int8 pool but whose
    scales that kernel refuses at run time ("parameter out of computation range": MLAS needs
    input scale / (output scale x pixels) in [2^-32, 256)). A QAT file can hold such a pair: its
    learned range for the classifier's input, after a 1x1 pool, and the calibrated range of the
    pool's input 256 times or more apart. Node name -> (its input tensor, the range its output is
    quantized on)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in [*g.value_info, *g.input]}
    refused = {}
    for n in g.node:
        dq = producer.get(n.input[0]) if n.op_type == "GlobalAveragePool" else None
        qs = [c for c in g.node if c.op_type == "QuantizeLinear" and c.input[0] == n.output[0]] if dq else []
        spatial = shapes.get(n.input[0], [])[2:]
        if dq is None or dq.op_type != "DequantizeLinear" or not qs or not spatial or not all(spatial) \
                or dq.input[1] not in consts:
            continue
        q = qs[0]
        if q.input[1] not in consts or len(q.input) < 3 or q.input[2] not in consts:
            continue
        ratio = float(consts[dq.input[1]]) / (float(consts[q.input[1]]) * float(np.prod(spatial)))
        if not POOL_SCALE[0] <= ratio < POOL_SCALE[1]:
            scale, zp = float(consts[q.input[1]]), consts[q.input[2]]
            grid = np.iinfo(zp.dtype)
            q_in = producer.get(dq.input[0])  # the float tensor the quantizer named: the override's key
            tensor = q_in.input[0] if q_in is not None and q_in.op_type == "QuantizeLinear" else n.input[0]
            refused[n.name] = (tensor, (grid.min - int(zp)) * scale, (grid.max - int(zp)) * scale)
    return refused


def _override(lo: float, hi: float) -> list[dict]:
    """One tensor's onnxruntime TensorQuantOverrides entry: quantized on [lo, hi] (0 inside it)."""
    return [{"rmin": np.float32(min(lo, 0.0)), "rmax": np.float32(max(hi, 0.0))}]


def _input_ranges(graph, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The range of the input tensor of each Conv/Gemm whose weight has a range, by tensor name;
    a tensor feeding several of them gets the union. Shape-only ops
    (Flatten before the classifier) pass their input's quantization through in onnxruntime,
    so their input gets the range too."""
    producer = {o: n for n in graph.node for o in n.output}
    by_tensor: dict[str, tuple[float, float]] = {}
    for n in graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in ranges:
            lo, hi = ranges[n.input[1]]
            tensor = n.input[0]
            while True:
                old = by_tensor.get(tensor, (lo, hi))
                by_tensor[tensor] = (min(lo, old[0], 0.0), max(hi, old[1], 0.0))
                p = producer.get(tensor)
                if p is None or p.op_type not in ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose"):
                    break
                tensor = p.input[0]
    return by_tensor


def _group(node) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)
