"""BatchNorm statistics that match the weights they normalise.

A BN layer's running mean/var are an exponential average over the training steps, so they
lag behind the weights. With torchvision's default momentum 0.1 the lag is a few dozen
steps; MobileNetV3 and EfficientNet use 0.01, so after a short run (a few hundred steps)
the running statistics are still mostly their initial values and the eval-mode model is
at chance while the same weights score well with batch statistics. Removing channels
(prune) shifts them too. `bn_gap` measures the mismatch (eval mode vs batch statistics on
the same training images); every training run ends with it and re-estimates the statistics
(`recalibrate_bn`) where they lag (train._settle_bn), and the prune stage after each cut."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from . import dist
from .data import Data, balanced_draw
from .inference import channels_last


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _batches(data: Data, images: int, seed: int, device: torch.device, share: tuple[int, int] = (0, 1)):
    """`images` training images (a seeded sample, no augmentation) in training-size batches; a
    lone last image joins the batch before it (batch statistics need two). Drawn as training
    draws them (data.sampling), so the statistics are those of the batches the weights saw.
    `share` = (rank, ranks): every ranks-th batch, so the ranks of a group split one
    single-process pass."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data.train)
    idx = (balanced_draw(data.train.labels, min(images, n), gen) if data.sampling == "balanced"
           else torch.randperm(n, generator=gen)[:images])
    chunks = list(idx.split(data.batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    for i in chunks[share[0]::share[1]]:
        yield data.normalize(data.train.images[i].to(device)), data.train.labels[i].to(device)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Data, device: torch.device, images: int, seed: int,
                   together: bool = False) -> bool:
    """Re-estimate BatchNorm running statistics on `images` training images (a cumulative
    mean over batches, not an EMA). Returns whether the model had any BatchNorm.

    `together`: every rank of a torchrun group makes this call; each runs its share of the
    batches and the per-batch means are averaged over all of them, as one process would."""
    bns = batchnorms(model)
    if not bns or images <= 0:
        return False
    momenta = [m.momentum for m in bns]
    was_training = model.training
    model.eval()  # dropout and the like stay off; only the BN layers collect statistics
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    share = dist.share(together)
    with channels_last(device, model):
        for x, _ in _batches(data, images, seed, device, share):
            model(x)
    if share[1] > 1:  # each rank's average over its k batches, weighted by k
        for m in bns:
            k = m.num_batches_tracked.to(device=m.running_mean.device, dtype=m.running_mean.dtype)
            flat = dist.all_sum(torch.cat([m.running_mean * k, m.running_var * k, k.reshape(1)]), "re-estimating BatchNorm")
            c = m.running_mean.numel()
            m.running_mean.copy_(flat[:c] / flat[-1])
            m.running_var.copy_(flat[c:2 * c] / flat[-1])
            m.num_batches_tracked.fill_(int(flat[-1]))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return True


@torch.no_grad()
def bn_gap(model: nn.Module, data: Data, device: torch.device, images: int, seed: int,
           together: bool = False) -> dict | None:
    """Top-1 of the same training images with running statistics (eval mode) and with batch
    statistics (what the weights were trained with), in percent, and the mean |logit| of each
    (`*_logit_scale`); None without BatchNorm. `together`: as for recalibrate_bn, the ranks count
    their shares of the images.

    A large gap means the running statistics do not fit the weights; overfitting cannot cause
    it, since both figures are on the same images. The logit scales catch what top-1 can miss: a
    barely trained network whose running statistics blow its activations up layer by layer at
    the same near-chance top-1 (a timm MobileNetV4 at 32 px, benchmarks/README.md), which int8
    calibration and QAT then inherit."""
    bns = batchnorms(model)
    if not bns or images <= 0:
        return None
    was_training = model.training
    momenta = [m.momentum for m in bns]
    sums = dict.fromkeys(("eval_mode_top1", "batch_stats_top1", "eval_mode_logit_scale", "batch_stats_logit_scale"), 0.0)
    n = 0
    share = dist.share(together)
    with channels_last(device, model):
        for x, y in _batches(data, images, seed, device, share):
            for mode in ("eval_mode", "batch_stats"):
                model.eval()
                if mode == "batch_stats":
                    for m in bns:
                        m.train()
                        m.momentum = 0.0  # normalise with batch statistics, leave the running ones untouched
                logits = model(x).float()
                sums[f"{mode}_top1"] += float((logits.argmax(1) == y).sum())
                sums[f"{mode}_logit_scale"] += float(logits.abs().mean(1).sum())
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            n += len(y)
    model.train(was_training)
    if share[1] > 1:
        total = dist.all_sum(torch.tensor([*sums.values(), n], dtype=torch.float64, device=device),
                             "checking BatchNorm statistics")
        sums, n = dict(zip(sums, total[:-1].tolist())), float(total[-1])
    return {k: round(100.0 * v / n, 3) if k.endswith("top1") else v / n for k, v in sums.items()}


LOGIT_SCALE_OFF = 10.0  # eval-mode logits this many times larger (or smaller) than with batch statistics


def logits_off(gap: dict) -> bool:
    """Whether bn_gap's logit scales say the running statistics do not hold the network (the end
    of every training run re-estimates them; a QAT that diverges names them)."""
    return logit_scale_ratio(gap) > LOGIT_SCALE_OFF


def logit_scale_ratio(gap: dict) -> float:
    """How far the eval-mode logits' scale is from the batch-statistics one (bn_gap), as a factor
    >= 1 either way: 1 where they are equal (a zero head), inf where they differ and either is not
    finite or is zero."""
    a, b = gap["eval_mode_logit_scale"], gap["batch_stats_logit_scale"]
    if a == b:
        return 1.0
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return math.inf
    return max(a / b, b / a)
