"""LiteRT (TensorFlow Lite): .tflite files for Android apps and Linux boards, converted by
litert-torch; int8 by litert-torch's own PT2E quantizer on the quantize stage's calibration
images (QAT variants from the QAT-trained weights snapped to the int8 grid). Float input and
output by default; `export.options.litert.integer_io` keeps the int8 interface. Metadata in
the file's own metadata table (litert_export)."""

from __future__ import annotations

import copy
from pathlib import Path

from pydantic import Field

from ..schema import Strict
from .base import FORMATS, ConvertJob, Format, Runner, Variant


class LiteRTOptions(Strict):
    integer_io: bool = Field(False, description="int8 files take int8 input and give int8 output (NPUs, "
                                                "microcontrollers); the scale and zero point are in the metadata")


@FORMATS.register("litert")
class LiteRT(Format):
    key, suffix, module, install_hint, what = "tflite", ".tflite", "litert_torch", "pip install 'edgekd[litert]'", "LiteRT"
    runtime, own_int8 = "litert", True
    Options = LiteRTOptions

    def export(self, v: Variant, path: Path, job: ConvertJob, keep_fp32: list[str] = ()) -> Path:
        from ..litert_export import export_tflite

        src = v.int8_source if v.int8 else v.reference
        opts = job.options_for("litert", self.Options)
        return export_tflite(copy.deepcopy(src), path, job.image_size, job.calibration() if v.int8 else None,
                             integer_io=opts.integer_io, keep_fp32=keep_fp32)

    def write_metadata(self, path: Path, props: dict[str, str]) -> None:
        from ..litert_export import write_metadata

        write_metadata(path, props)

    def read_metadata(self, path: Path) -> dict[str, str]:
        from ..litert_export import read_metadata

        return read_metadata(path)

    def runner(self, path: Path, threads: int = 1) -> Runner:
        from ..litert_export import tflite_runner

        return tflite_runner(path, threads)

    def input_shape(self, path: Path) -> list[int]:
        from ..litert_export import input_shape

        return input_shape(path)
