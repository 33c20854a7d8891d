"""The terms an objective is made of. Each loss is one class with its own options (`Params`),
registered by name; a new loss is one new class here and nothing else changes (the term's
YAML schema, `edgekd stages` and the training loop pick it up from the registry)."""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
import math
from typing import ClassVar, Literal, Optional, Union

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
        if issubclass(cls, LogitLoss):
            fields["teacher"] = (Optional[Union[str, list[str]]], Field(
                None, description="pipeline teacher name (default: the only one), or several whose softened "
                                  "distributions are averaged"))
            fields["teacher_weights"] = (Union[Literal["equal", "val_acc"], list[float]], Field(
                "equal", description="with several teachers: equal, val_acc (each teacher's top-1 on data.val_split), "
                                     "or one weight per teacher"))
        elif cls.needs_teacher:
            fields["teacher"] = (Optional[str], Field(None, description="name of the pipeline teacher (default: the only one)"))
        cls.Term = create_model(f"{cls.__name__}Term", __base__=cls.Params, __doc__=cls.__doc__, **fields)
        return LOSSES.register(name)(cls)

    return deco


def kl_div(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True)


def standardize(z: torch.Tensor) -> torch.Tensor:
    """Z-score each row of logits (Sun et al., CVPR 2024): the student then matches the shape of
    the teacher's logits, not their scale or offset."""
    return (z - z.mean(1, keepdim=True)) / (z.std(1, keepdim=True) + 1e-7)


class LogitParams(Strict):
    """Options every logit loss has (each also sets its own `temperature`, which several teachers are mixed at)."""

    standardize: bool = Field(False, description="z-score logits before softening (logit standardization)")


class LogitLoss(Loss):
    """A term on the teachers' temperature-softened class distributions. Several teachers are
    mixed there: softmax(mixture / T) is the weighted mean of their softmax(logits / T), so the
    loss itself is written for one teacher. With `standardize`, every teacher's and the
    student's logits are z-scored first."""

    def prep(self, z: torch.Tensor) -> torch.Tensor:
        return standardize(z) if self.term.standardize else z

    def teacher_logits(self, teachers: list[Outputs], weights: list[float]) -> Outputs:
        zs = [self.prep(o.logits) for o in teachers]
        if len(zs) == 1:
            return Outputs(zs[0])
        t = self.term.temperature
        logp = [math.log(w) + F.log_softmax(z / t, dim=1) for w, z in zip(weights, zs) if w > 0]
        return Outputs(t * torch.logsumexp(torch.stack(logp), dim=0))


class CEParams(Strict):
    label_smoothing: float = Field(0.0, ge=0, lt=1)


@register_loss("ce")
class CrossEntropy(Loss):
    """Cross-entropy with the labels."""

    Params = CEParams
    needs_teacher = False

    def forward(self, student, teacher, labels, epoch):
        return {"loss": F.cross_entropy(student.logits, labels, label_smoothing=self.term.label_smoothing)}


class KDParams(LogitParams):
    temperature: float = Field(4.0, gt=0)


@register_loss("kd")
class KD(LogitLoss):
    """Hinton et al. 2015: T^2 * KL(softmax(teacher/T) || softmax(student/T))."""

    Params = KDParams

    def forward(self, student, teacher, labels, epoch):
        t = self.term.temperature
        return {"loss": kl_div(teacher.logits, self.prep(student.logits), t) * t**2}


@register_loss("mse_logits")
class MSELogits(Loss):
    """Mean squared error between student and teacher logits."""

    def forward(self, student, teacher, labels, epoch):
        mse = F.mse_loss(student.logits, teacher.logits)
        return {"loss": mse, "mse": mse}


class DKDParams(LogitParams):
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(1.0, ge=0, description="weight of the target-class part (TCKD)")
    beta: float = Field(8.0, ge=0, description="weight of the non-target part (NCKD)")
    warmup_epochs: int = Field(0, ge=0, description="ramp the term in linearly over this many epochs")


@register_loss("dkd")
class DKD(LogitLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): warmup * (alpha * TCKD + beta * NCKD).

    TCKD is the KL between binary target/non-target probabilities; NCKD the KL among the
    non-target classes only (the target logit is masked out with a large negative)."""

    Params = DKDParams

    def forward(self, student, teacher, labels, epoch):
        p, T = self.term, self.term.temperature
        s, t = self.prep(student.logits), teacher.logits
        gt = F.one_hot(labels, s.shape[1]).bool()
        ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)
        bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], dim=1).clamp_min(1e-12)
        bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], dim=1).clamp_min(1e-12)
        tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * T**2
        big = 1000.0 * gt
        nckd = kl_div(t / T - big, s / T - big, 1.0) * T**2
        warm = min(1.0, (epoch + 1) / p.warmup_epochs) if p.warmup_epochs else 1.0
        return {"loss": warm * (p.alpha * tckd + p.beta * nckd), "tckd": tckd, "nckd": nckd}


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`."""
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)


class DISTParams(LogitParams):
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(1.0, ge=0, description="weight of the inter-class relation (each image's class ranking)")
    gamma: float = Field(1.0, ge=0, description="weight of the intra-class relation (each class across the batch)")


@register_loss("dist")
class DIST(LogitLoss):
    """DIST (Huang et al., NeurIPS 2022): match the teacher's class relations, not its exact
    probabilities: T^2 * (beta * (1 - mean Pearson correlation of each image's distribution) +
    gamma * (1 - mean Pearson correlation of each class's column over the batch))."""

    Params = DISTParams

    def forward(self, student, teacher, labels, epoch):
        T = self.term.temperature
        ps, pt = F.softmax(self.prep(student.logits) / T, dim=1), F.softmax(teacher.logits / T, dim=1)
        inter = (1 - pearson_rows(ps, pt).mean()) * T**2
        intra = (1 - pearson_rows(ps.T, pt.T).mean()) * T**2
        return {"loss": self.term.beta * inter + self.term.gamma * intra, "inter": inter, "intra": intra}


# ----------------------------------------------------------------------------- feature terms


def match_spatial(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool the larger of two feature maps to the other's height and width."""
    if s.shape[-2:] == t.shape[-2:]:
        return s, t
    if s.shape[-2] * s.shape[-1] > t.shape[-2] * t.shape[-1]:
        return F.adaptive_avg_pool2d(s, t.shape[-2:]), t
    return s, F.adaptive_avg_pool2d(t, s.shape[-2:])


class FeatureLoss(Loss):
    """A term on intermediate features; `build` sees one batch of them before training starts,
    so parameters sized by the features (a regressor) exist before the optimizer is made."""

    def build(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> None:
        pass


class FitNetParams(Strict):
    student_layer: str = Field(description="student module path whose output is regressed, e.g. features.13")
    teacher_layer: str = Field(description="teacher module path it is regressed onto, e.g. layer3")


@register_loss("fitnet")
class FitNet(FeatureLoss):
    """FitNets hint (Romero et al. 2015): MSE between a 1x1-conv regression of a student feature
    map and a teacher feature map (spatial sizes pooled to match); the regressor is trained with
    the student and not part of the exported model."""

    Params = FitNetParams

    def student_taps(self):
        return [self.term.student_layer]

    def teacher_taps(self):
        return [self.term.teacher_layer]

    def build(self, student, teacher):
        s, t = student[self.term.student_layer], teacher[self.term.teacher_layer]
        if s.ndim != t.ndim or s.ndim not in (2, 4):
            raise ValueError(f"fitnet: student {self.term.student_layer} gives {tuple(s.shape)}, teacher "
                             f"{self.term.teacher_layer} {tuple(t.shape)}: expected two conv maps or two vectors")
        conv = nn.Conv2d if s.ndim == 4 else nn.Linear
        self.regressor = conv(s.shape[1], t.shape[1], **({"kernel_size": 1, "bias": False} if s.ndim == 4 else {}))
        if s.ndim == 4:
            self.regressor = nn.Sequential(self.regressor, nn.BatchNorm2d(t.shape[1]))

    def forward(self, student, teacher, labels, epoch):
        s = self.regressor(student.features[self.term.student_layer])
        t = teacher.features[self.term.teacher_layer]
        if s.ndim == 4:
            s, t = match_spatial(s, t)
        return {"loss": F.mse_loss(s, t)}


class ATParams(Strict):
    layers: list[tuple[str, str]] = Field(min_length=1, description="[student path, teacher path] pairs, e.g. "
                                                                    "[[features.6, layer2], [features.13, layer3]]")
    p: float = Field(2.0, gt=0, description="attention = mean over channels of |feature|^p")


@register_loss("at")
class AttentionTransfer(Loss):
    """Attention transfer (Zagoruyko & Komodakis 2017): per pair of layers, the squared distance
    between L2-normalised spatial attention maps (channel mean of |f|^p), averaged over pairs;
    channel counts may differ, spatial sizes are pooled to match. Usual weights are large (~1000)."""

    Params = ATParams

    def student_taps(self):
        return [s for s, _ in self.term.layers]

    def teacher_taps(self):
        return [t for _, t in self.term.layers]

    def _attention(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.abs().pow(self.term.p).mean(1).flatten(1), dim=1)

    def forward(self, student, teacher, labels, epoch):
        total = 0.0
        for s_path, t_path in self.term.layers:
            s, t = student.features[s_path], teacher.features[t_path]
            if s.ndim != 4 or t.ndim != 4:
                raise ValueError(f"at: {s_path} / {t_path} are not conv feature maps ({tuple(s.shape)}, {tuple(t.shape)})")
            s, t = match_spatial(s, t)
            total = total + (self._attention(s) - self._attention(t)).pow(2).mean()
        return {"loss": total / len(self.term.layers)}
