"""Evaluation metrics: top-1, per-class precision/recall/F1, ECE, parameters, MACs, size."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn


def guessing_level(m: dict) -> tuple[float, float] | None:
    """(what a model that knows nothing scores on this split, the margin), top-1 %, where `m`'s
    top-1 is within that margin of it: guessing is the larger of one class in k and the largest
    class's share, the margin 5 points or three binomial standard deviations of the split's size.
    None for a model above it. A teacher there was trained on other classes, in another order, at
    another size or normalisation, or not at all, and distilling from it teaches nothing."""
    support = [c["support"] for c in m["per_class"].values()]
    n = sum(support)
    if not n:
        return None
    base = max(1 / len(support), max(support) / n)
    margin = max(5.0, 300 * math.sqrt(base * (1 - base) / n))
    return None if m["top1"] >= 100 * base + margin else (round(100 * base, 1), round(margin, 1))


def mcnemar_p(worse: int, better: int) -> float:
    """Exact one-sided McNemar p-value: P(at least `worse` of the worse+better discordant images
    go against the new run | either direction is equally likely)."""
    n = worse + better
    if n == 0:
        return 1.0
    return min(1.0, sum(math.comb(n, k) for k in range(worse, n + 1)) / 2**n)


def paired(base: list[int], now: list[int], labels: list[int]) -> dict:
    """Discordant counts and p-values of `now` against `base` on the same labelled images."""
    b_ok = [p == y for p, y in zip(base, labels)]
    n_ok = [p == y for p, y in zip(now, labels)]
    worse = sum(b and not n for b, n in zip(b_ok, n_ok))
    better = sum(n and not b for b, n in zip(b_ok, n_ok))
    return {"worse": worse, "better": better, "p_worse": mcnemar_p(worse, better), "p_better": mcnemar_p(better, worse)}


def gain_over(base: list[int], now: list[int], labels: list[int]) -> dict:
    """What the predictions `now` gained over `base` on the same test images, and whether that is
    more than those images' noise: a student's top-1 moves by points between seeds on a test
    subset, so a gain is reported with its two-sided exact McNemar p-value on the images the two
    models disagree on. The top-1 difference is theirs too: (better - worse) / images."""
    t = paired(base, now, labels)
    return {"points": round(100 * (t["better"] - t["worse"]) / len(labels), 3), "images": len(labels),
            "better": t["better"], "worse": t["worse"], "p": round(min(1.0, 2 * min(t["p_better"], t["p_worse"])), 4)}


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str], bins: int = 15) -> dict:
    """Metrics from raw logits; works for PyTorch and any runtime's outputs alike."""
    logits = logits.astype(np.float64)
    z = logits - logits.max(1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    pred = probs.argmax(1)
    conf = probs.max(1)
    correct = pred == labels
    per_class = {}
    for i, c in enumerate(classes):
        tp = int(((pred == i) & (labels == i)).sum())
        fp = int(((pred == i) & (labels != i)).sum())
        fn = int(((pred != i) & (labels == i)).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        per_class[c] = {"precision": round(p, 4), "recall": round(r, 4),
                        "f1": round(2 * p * r / (p + r), 4) if p + r else 0.0, "support": int((labels == i).sum())}
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return {
        "top1": round(100.0 * float(correct.mean()), 3),
        "ece": round(float(ece), 4),
        "macro_f1": round(float(np.mean([v["f1"] for v in per_class.values()])), 4),
        "n": int(len(labels)),
        "per_class": per_class,
        # per-image top-1, kept out of report.json (report.py writes predictions.json) for edgekd check's paired test
        "predictions": pred.astype(int).tolist(),
    }


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch-pruning's counter)."""
    import torch_pruning as tp

    p = next(model.parameters(), None)
    device = p.device if p is not None else "cpu"
    was_training = model.training
    model.eval()
    macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, image_size, image_size, device=device))
    model.train(was_training)
    return int(macs)


def model_stats(model: nn.Module, image_size: int) -> dict:
    return {"params": count_params(model), "macs": count_macs(model, image_size)}
