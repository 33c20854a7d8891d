"""Stage registry; importing this package registers the built-in stages."""

from .base import STAGES, Stage, StageResult, register
from . import assistant, benchmark, distill, export, prune, quantize  # noqa: F401  (registers)

__all__ = ["STAGES", "Stage", "StageResult", "register"]
