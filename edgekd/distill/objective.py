"""The training objective: weighted terms, each a registered loss with its own options and
(for distillation terms) a named teacher. One object serves distill, the prune fine-tune and
QAT; the training loop only asks it for the teachers' outputs and the loss of a batch.

In YAML: `objective: [{loss: kd, teacher: r50, weight: 0.9, temperature: 4}, {loss: ce, weight: 0.1}]`,
or the shorthand `loss: kd` with `temperature` / `alpha` (expanded by `shorthand_terms`)."""

from __future__ import annotations

from typing import Annotated, Callable, Union

import torch
import torch.nn as nn
from pydantic import BaseModel, Field

from .losses import LOSSES, FeatureLoss, LogitLoss, Outputs
from .taps import FeatureTaps
from .teachers import TeacherSource


def term_type():
    """The schema of one objective entry: a union of every registered loss's Term, told apart by `loss`."""
    terms = tuple(cls.Term for _, cls in LOSSES.items())
    return Annotated[Union[terms], Field(discriminator="loss")]


def shorthand_terms(loss: str, *, temperature: float, alpha: float, dkd_alpha: float, dkd_beta: float,
                    dkd_warmup_epochs: int, label_smoothing: float) -> list[BaseModel]:
    """`loss: kd` (and its flat options) as the objective it stands for; the sums are the ones
    edgekd computed before objectives existed, term for term, so figures do not move."""
    ce = LOSSES.get("ce").Term(loss="ce", label_smoothing=label_smoothing)
    if loss == "ce":
        return [ce]
    ce = ce.model_copy(update={"weight": 1 - alpha})
    if loss == "kd":
        return [LOSSES.get("kd").Term(loss="kd", weight=alpha, temperature=temperature), ce]
    if loss == "mse_logits":
        return [LOSSES.get("mse_logits").Term(loss="mse_logits", weight=alpha), ce]
    if loss == "dkd":  # ce after dkd: autograd then sums the gradients in the order it always has
        return [LOSSES.get("dkd").Term(loss="dkd", temperature=temperature, alpha=dkd_alpha, beta=dkd_beta,
                                       warmup_epochs=dkd_warmup_epochs), ce.model_copy(update={"weight": 1.0})]
    raise KeyError(f"unknown loss shorthand '{loss}'")


def teacher_names(term: BaseModel) -> list[str]:
    """The teachers a term reads (none, one, or several to be mixed); None entries are the default one."""
    if not LOSSES.get(term.loss).needs_teacher:
        return []
    return list(term.teacher) if isinstance(term.teacher, list) else [term.teacher]


def teacher_weights(term: BaseModel) -> list[float]:
    """A term's teacher mixture weights, normalised to sum to one ("val_acc" must be resolved first)."""
    names, w = teacher_names(term), getattr(term, "teacher_weights", "equal")
    if w == "equal":
        return [1 / len(names)] * len(names)
    if isinstance(w, str):
        raise ValueError(f"objective term '{term.loss}': teacher_weights {w!r} not resolved to numbers")
    return [x / sum(w) for x in w]


def part_names(terms: list[BaseModel]) -> list[str]:
    """History key of each term: the loss name, told apart by teacher or position when repeated."""
    names = []
    for i, t in enumerate(terms):
        same = [u for u in terms if u.loss == t.loss]
        labels = ["+".join(map(str, teacher_names(u))) for u in same]
        if len(same) == 1:
            names.append(t.loss)
        elif len(set(labels)) == len(same):
            names.append(f"{t.loss}_{labels[same.index(t)]}")
        else:
            names.append(f"{t.loss}_{i}")
    return names


TeacherFactory = Callable[[str, list[str]], TeacherSource]  # (teacher name, feature paths) -> source


class Objective(nn.Module):
    """sum_i weight_i * term_i(student, teacher_i, labels). Terms are modules, so any trained
    parameters they hold (a regressor, say) are trained and checkpointed with the student."""

    def __init__(self, terms: list[BaseModel], teachers: TeacherFactory | None = None):
        super().__init__()
        self.specs = list(terms)
        self.terms = nn.ModuleList(LOSSES.get(t.loss)(t) for t in terms)
        self.names = part_names(self.specs)
        distilling = [(spec, term) for spec, term in zip(self.specs, self.terms) if term.needs_teacher]
        if distilling and teachers is None:
            raise ValueError(f"loss '{distilling[0][0].loss}' needs a teacher")
        needed: dict[str, list[str]] = {}
        for spec, term in distilling:
            for name in teacher_names(spec):
                if name is None:
                    raise ValueError(f"objective term '{spec.loss}' names no teacher")
                needed.setdefault(name, []).extend(term.teacher_taps())
        self.weights = [teacher_weights(spec) if term.needs_teacher else [] for spec, term in zip(self.specs, self.terms)]
        self.teachers = {name: teachers(name, paths) for name, paths in needed.items()}
        self.student_paths = [p for term in self.terms for p in term.student_taps()]
        self._taps: FeatureTaps | None = None

    # ----------------------------------------------------------------- the loop's calls
    def attach(self, student: nn.Module) -> None:
        """Tap the student's features the terms read (hooks stay until `detach`)."""
        if self.student_paths:
            self._taps = FeatureTaps(student, self.student_paths, "student")

    @torch.no_grad()
    def prepare(self, student: nn.Module, x: torch.Tensor) -> None:
        """Let feature terms size their parameters from one batch (student in eval mode, so its
        BatchNorm statistics are untouched) before the optimizer is made."""
        building = [(s, t) for s, t in zip(self.specs, self.terms) if isinstance(t, FeatureLoss)]
        if not building:
            return
        was_training = student.training
        student.eval()
        try:
            s_feats = self.student_outputs(student(x)).features
        finally:
            student.train(was_training)
        idx, flip = torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x), dtype=torch.bool)
        t_feats = {name: out.features for name, out in self.teacher_outputs(x, idx, flip).items()}
        for spec, term in building:
            term.build(s_feats, t_feats.get(teacher_names(spec)[0], {}))

    def detach(self) -> None:
        if self._taps:
            self._taps.remove()
            self._taps = None

    def teacher_outputs(self, x: torch.Tensor, idx: torch.Tensor, flip: torch.Tensor) -> dict[str, Outputs]:
        return {name: src(x, idx, flip) for name, src in self.teachers.items()}

    def student_outputs(self, logits: torch.Tensor) -> Outputs:
        feats = {k: v.float() for k, v in self._taps.take().items()} if self._taps else {}
        return Outputs(logits.float(), feats)

    def forward(self, student: Outputs, teachers: dict[str, Outputs], labels: torch.Tensor,
                epoch: int) -> dict[str, torch.Tensor]:
        total, parts = None, {}
        for name, spec, term, weights in zip(self.names, self.specs, self.terms, self.weights):
            mine = [teachers[n] for n in teacher_names(spec)] if term.needs_teacher else []
            teacher = term.teacher_logits(mine, weights) if isinstance(term, LogitLoss) else (mine or [None])[0]
            out = term(student, teacher, labels, epoch)
            weighted = spec.weight * out["loss"]
            total = weighted if total is None else total + weighted
            extra = {(k if name == spec.loss else f"{name}.{k}"): v for k, v in out.items() if k != "loss"}
            parts.update(extra or {name: out["loss"]})
        return {"loss": total, **parts}
