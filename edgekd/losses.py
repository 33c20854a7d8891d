"""Distillation objectives. Each returns a dict with `loss` (to backpropagate) and its parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Registry

LOSSES: Registry = Registry("loss")


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) averaged over the batch."""
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True)


@LOSSES.register("ce")
def ce_loss(s, y, t=None, *, label_smoothing: float = 0.0, **_):
    ce = F.cross_entropy(s, y, label_smoothing=label_smoothing)
    return {"loss": ce, "ce": ce}


@LOSSES.register("kd")
def kd_loss(s, y, t, *, temperature: float = 4.0, alpha: float = 0.9, label_smoothing: float = 0.0, **_):
    """Hinton et al. 2015: alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE."""
    ce = F.cross_entropy(s, y, label_smoothing=label_smoothing)
    kd = _kl(t, s, temperature) * temperature**2
    return {"loss": alpha * kd + (1 - alpha) * ce, "ce": ce, "kd": kd}


@LOSSES.register("mse_logits")
def mse_logits_loss(s, y, t, *, alpha: float = 0.9, label_smoothing: float = 0.0, **_):
    ce = F.cross_entropy(s, y, label_smoothing=label_smoothing)
    mse = F.mse_loss(s, t)
    return {"loss": alpha * mse + (1 - alpha) * ce, "ce": ce, "mse": mse}


@LOSSES.register("dkd")
def dkd_loss(s, y, t, *, temperature: float = 4.0, dkd_alpha: float = 1.0, dkd_beta: float = 8.0,
             ce_weight: float = 1.0, warmup: float = 1.0, label_smoothing: float = 0.0, **_):
    """Decoupled KD (Zhao et al., CVPR 2022): CE + warmup * (alpha * TCKD + beta * NCKD).

    TCKD is the KL between binary target/non-target probabilities; NCKD the KL among the
    non-target classes only (the target logit is masked out with a large negative)."""
    gt = F.one_hot(y, s.shape[1]).bool()
    ps, pt = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    bs = torch.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    bt = torch.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], dim=1).clamp_min(1e-12)
    tckd = (bt * (bt.log() - bs.log())).sum(1).mean() * temperature**2
    big = 1000.0 * gt
    nckd = _kl(t / temperature - big, s / temperature - big, 1.0) * temperature**2
    ce = F.cross_entropy(s, y, label_smoothing=label_smoothing)
    loss = ce_weight * ce + warmup * (dkd_alpha * tckd + dkd_beta * nckd)
    return {"loss": loss, "ce": ce, "tckd": tckd, "nckd": nckd}


def uses_teacher(name: str) -> bool:
    return name != "ce"
