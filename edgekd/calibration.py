"""Post-hoc temperature scaling (Guo et al. 2017): softmax confidences that mean what they say.

A distilled student copies a teacher's *softened* distribution and ends up over-confident;
a phone app that thresholds the softmax then acts on confidences that are too high. One
scalar T, fit by minimising the negative log-likelihood of logits / T on images held out
from training (never the test split), fixes most of it without changing a single top-1
decision (argmax is invariant to T). The export stage fits T per shipped file, on the
logits that file's runtime produces, and stores it in the file's metadata
(`edgekd.temperature`); deploy/python/classify.py divides by it."""

from __future__ import annotations

import numpy as np
import torch

from .metrics import classification_metrics

T_BOUNDS = (0.05, 20.0)  # where the fit stops: beyond them it is fitting noise, not confidence
FEW_IMAGES = 100  # a fit on fewer validation images is rough, and the report says so


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising NLL(softmax(logits / T), labels); LBFGS on log T (convex in 1/T)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(*T_BOUNDS))


def reliability(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, bins: int = 15) -> dict:
    """Per confidence bin: mean confidence, accuracy and count (the reliability diagram's bars)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf, correct = p.max(1), p.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    out = {"confidence": [], "accuracy": [], "count": []}
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        out["confidence"].append(round(float(conf[m].mean()), 4) if m.any() else None)
        out["accuracy"].append(round(float(correct[m].mean()), 4) if m.any() else None)
        out["count"].append(int(m.sum()))
    return out


def calibrate(val_logits: np.ndarray, val_labels: np.ndarray, test_logits: np.ndarray, test_labels: np.ndarray,
              classes: list[str]) -> dict:
    """Fit T on the validation logits; ECE and top-1 on the test split before and after.

    A fit that runs to a bound is not applied (T stays 1): on a handful of validation images, or
    with a model near chance there, the likelihood keeps improving as the softmax flattens
    towards uniform, and that T would make a confident, mostly right model useless on the test
    split. `note` says why, and when the fit stands on few images."""
    fit = fit_temperature(val_logits, val_labels)
    n, t, note = int(len(val_labels)), fit, None
    if not T_BOUNDS[0] < fit < T_BOUNDS[1]:
        t = 1.0
        note = (f"not applied: the fit ran to its bound (T = {fit:g}) on {n} validation images, where the model is "
                "near chance or the split too small (raise data.val_split)")
    elif n < FEW_IMAGES:
        note = f"fit on {n} validation images only: a rough temperature (raise data.val_split)"
    before = classification_metrics(test_logits, test_labels, classes)
    after = classification_metrics(test_logits / t, test_labels, classes)
    return {"temperature": round(t, 4), "temperature_fit": round(fit, 4), "val_images": n, **({"note": note} if note else {}),
            "ece_before": before["ece"], "ece_after": after["ece"], "top1": before["top1"], "top1_after": after["top1"],
            "reliability_before": reliability(test_logits, test_labels), "reliability_after": reliability(test_logits, test_labels, t)}
