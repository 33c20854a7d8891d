"""Model file formats as plug-ins: one class per format in the FORMATS registry.

A format knows how to write a model variant (fp32, or int8 from the calibration images or the
QAT-trained weights), how to stamp the runner metadata on the file, how to run the file (the
function verification and calibration call) and how to verify it against PyTorch. The export
stage loops over the enabled formats and the variants; adding a format is one new module
here, imported below."""

from .base import FORMATS, Format, Variant, enabled_formats, format_for
from . import onnx, executorch, litert, openvino  # noqa: F401,E402  (each registers itself)

__all__ = ["FORMATS", "Format", "Variant", "enabled_formats", "format_for"]
