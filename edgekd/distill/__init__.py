"""The distillation objective: losses with their own options (losses.py), teachers as cached
logits or live models (teachers.py), features by module path (taps.py), and the weighted sum
the training loop minimises (objective.py)."""

from .losses import LOSSES, Loss, Outputs, register_loss
from .objective import Objective, shorthand_terms, teacher_names, term_type
from .taps import FeatureTaps, resolve_module
from .teachers import TeacherSource

__all__ = ["LOSSES", "Loss", "Outputs", "register_loss", "Objective", "shorthand_terms", "teacher_names", "term_type",
           "FeatureTaps", "resolve_module", "TeacherSource"]
