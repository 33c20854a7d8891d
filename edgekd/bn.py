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

import torch
import torch.nn as nn

from .data import Data


def batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def _batches(data: Data, images: int, seed: int, device: torch.device):
    """`images` training images (a seeded sample, no augmentation) in training-size batches; a
    lone last image joins the batch before it (batch statistics need two)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=gen)[:images]
    chunks = list(idx.split(data.batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    for i in chunks:
        yield data.normalize(data.train.images[i].to(device)), data.train.labels[i].to(device)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, data: Data, device: torch.device, images: int, seed: int) -> bool:
    """Re-estimate BatchNorm running statistics on `images` training images (a cumulative
    mean over batches, not an EMA). Returns whether the model had any BatchNorm."""
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
    for x, _ in _batches(data, images, seed, device):
        model(x)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.train(was_training)
    return True


@torch.no_grad()
def bn_gap(model: nn.Module, data: Data, device: torch.device, images: int, seed: int) -> dict | None:
    """Top-1 of the same training images with running statistics (eval mode) and with batch
    statistics (what the weights were trained with), in percent; None without BatchNorm.

    A large gap means the running statistics do not fit the weights; overfitting cannot cause
    it, since both figures are on the same images."""
    bns = batchnorms(model)
    if not bns or images <= 0:
        return None
    was_training = model.training
    momenta = [m.momentum for m in bns]
    hits = {"eval_mode_top1": 0, "batch_stats_top1": 0}
    n = 0
    for x, y in _batches(data, images, seed, device):
        model.eval()
        hits["eval_mode_top1"] += int((model(x).argmax(1) == y).sum())
        for m in bns:
            m.train()
            m.momentum = 0.0  # normalise with batch statistics, leave the running ones untouched
        hits["batch_stats_top1"] += int((model(x).argmax(1) == y).sum())
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        n += len(y)
    model.train(was_training)
    return {k: round(100.0 * v / n, 3) for k, v in hits.items()}
