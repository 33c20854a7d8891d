"""OpenVINO: the int8 ONNX file planned for OpenVINO rather than for onnxruntime.

The quantize stage plans its int8 ONNX file on one runtime (`quantize.plan_runtime`,
onnxruntime by default), and OpenVINO runs the same QDQ graph with other kernels (its
low-precision transformations): a MobileNetV3-large file that is 1.05x its fp32 speed on
onnxruntime ran at 0.6x on OpenVINO. So OpenVINO gets its own int8 file per int8 variant,
chosen on OpenVINO like ExecuTorch's and LiteRT's (formats.int8_plan): the quantize stage's
int8 file, or the fp32 program of the same weights where int8 does not pay on OpenVINO.

The files are ONNX (`<variant>.openvino.onnx`, which OpenVINO reads directly, with the same
metadata table), written for int8 variants only: for fp32 variants the ONNX format's file is
the same graph, and the benchmark's OpenVINO runtime runs those (bench.runtimes)."""

from __future__ import annotations

from pathlib import Path

from ..errors import EdgekdError
from .base import FORMATS, ConvertJob, Format, Runner, Variant
from .onnx import Onnx


@FORMATS.register("openvino")
class OpenVINO(Onnx):
    key, suffix, what = "openvino", ".openvino.onnx", "OpenVINO"
    module, install_hint = "openvino", "pip install 'edgekd[mobile]'"
    primary, runtime, own_int8, float_files = False, "openvino", True, "onnx"

    def int8_choices(self, kept: list[str], plan_name: str) -> dict[str, list[str] | None]:
        """The quantize stage's int8 file (whatever it keeps fp32) or no int8 at all: this format
        has no quantizer of its own to try other plans with."""
        return {f"quantize plan ({plan_name})": kept, "fp32": None}

    def export(self, v: Variant, path: Path, job: ConvertJob, keep_fp32: list[str] = ()) -> Path:
        if v.int8 and v.onnx_int8 is None:
            raise EdgekdError(f"{path.name}: an OpenVINO int8 file is the quantize stage's int8 ONNX file, and {v.name} "
                              "has none")
        return super().export(v, path, job)  # that file, or the fp32 program

    def runner(self, path: Path, threads: int = 1) -> Runner:
        from ..bench.runtimes import OpenVINO as Runtime

        return Runtime().load(path, threads)

    def details(self, path: Path) -> dict:
        return {}  # the op counts in the report are the ONNX format's file's

    def verify(self, path: Path, v: Variant, job) -> dict:
        """As every format verifies its file (base.Format.verify): against the int8 file's float
        source, with the PTQ agreement, since OpenVINO's int8 kernels round in their own way."""
        return Format.verify(self, path, v, job)
