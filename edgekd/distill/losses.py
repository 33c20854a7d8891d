"""The terms an objective is made of. Each loss is one class with its own options (`Params`),
registered by name; a new loss is one new class here and nothing else changes (the term's
YAML schema, `edgekd stages` and the training loop pick it up from the registry)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, create_model

from ..registry import Registry
from ..schema import Strict


@dataclass
class Outputs:
    """What a model produced for a batch: its logits and the features tapped by module path."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)


class NoParams(Strict):
    pass


class Loss(nn.Module):
    """One term of an objective: a module (so a term may own trained parameters, dropped at
    export) that maps student outputs, the term's teacher's outputs and labels to a dict with
    `loss` (unweighted; the objective applies the weight) and any parts worth logging."""

    name: ClassVar[str]
    Params: ClassVar[type[Strict]] = NoParams
    Term: ClassVar[type[Strict]]  # Params plus `loss`, `weight` (and `teacher`): one YAML objective entry
    needs_teacher: ClassVar[bool] = True

    def __init__(self, term: Strict):
        super().__init__()
        self.term = term

    def student_taps(self) -> list[str]:
        """Module paths of the student whose outputs this term reads."""
        return []

    def teacher_taps(self) -> list[str]:
        return []

    @abstractmethod
    def forward(self, student: Outputs, teacher: Outputs | None, labels: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        ...


LOSSES: Registry[type[Loss]] = Registry("loss")


def register_loss(name: str):
    """Register a Loss class and derive its objective-entry schema from its Params."""

    def deco(cls: type[Loss]) -> type[Loss]:
        cls.name = name
        fields = {"loss": (Literal[name], ...),
                  "weight": (float, Field(1.0, ge=0, description="multiplies this term in the objective"))}
        if cls.needs_teacher:
            fields["teacher"] = (Optional[str], Field(None, description="name of the pipeline teacher (default: the only one)"))
        cls.Term = create_model(f"{cls.__name__}Term", __base__=cls.Params, __doc__=cls.__doc__, **fields)
        return LOSSES.register(name)(cls)

    return deco


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True)


class CEParams(Strict):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@register_loss("ce")
class CrossEntropy(Loss):
    """Cross-entropy with the labels."""

    Params = CEParams
    needs_teacher = False

    def forward(self, student, teacher, labels, epoch):
        return {"loss": F.cross_entropy(student.logits, labels, label_smoothing=self.term.label_smoothing)}


class TemperatureParams(Strict):
    temperature: float = Field(4.0, gt=0)


@register_loss("kd")
class KD(Loss):
    """Hinton et al. 2015: T^2 * KL(softmax(teacher/T) || softmax(student/T))."""

    Params = TemperatureParams

    def forward(self, student, teacher, labels, epoch):
        t = self.term.temperature
        return {"loss": kl_div(teacher.logits, student.logits, t) * t**2}


@register_loss("mse_logits")
class MSELogits(Loss):
    """Mean squared error between student and teacher logits."""

    def forward(self, student, teacher, labels, epoch):
        mse = F.mse_loss(student.logits, teacher.logits)
        return {"loss": mse, "mse": mse}


class DKDParams(Strict):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(1.0, ge=0, description="weight of the target-class part (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target part (NCKD)")
    warmup_epochs: int = Field(0, ge=0, description="ramp the term in linearly over this many epochs")


@register_loss("dkd")
class DKD(Loss):
    """Decoupled KD (Zhao et al., CVPR 2022): warmup * (alpha * TCKD + beta * NCKD).

    TCKD is the KL between binary target/non-target probabilities; NCKD the KL among the
    non-target classes only (the target logit is masked out with a large negative)."""

    Params = DKDParams

    def forward(self, student, teacher, labels, epoch):
        p, T = self.term, self.term.temperature
        s, t = student.logits, teacher.logits
        gt = F.one_hot(labels, s.shape[1]).bool()
        ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
        bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], dim=1).clamp_min(1e-12)
        bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], dim=1).clamp_min(1e-12)
        tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * T**2
        big = 1000.0 * gt
        nckd = kl_div(t / T - big, s / T - big, 1.0) * T**2
        warm = min(1.0, (epoch + 1) / p.warmup_epochs) if p.warmup_epochs else 1.0
        return {"loss": warm * (p.alpha * tckd + p.beta * nckd), "tckd": tckd, "nckd": nckd}
