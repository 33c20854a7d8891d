"""Corrupted test images, CIFAR-10-C style (Hendrycks & Dietterich 2019), made on tensors.

A phone camera gives noisy, blurred, badly exposed, JPEG-compressed and partly covered
images; compression (pruning, int8) can cost more accuracy there than on clean test
images. Each corruption here maps a uint8 N x 3 x H x W batch to a corrupted uint8 batch at
severity 1-5, deterministically (a seeded generator per corruption, severity and chunk), so
every model variant sees the very same corrupted pixels. The severity constants are
CIFAR-10-C's; spatial ones (blur radii, kernel lengths) are given for 32 x 32 images and
scaled with the image size. Where torchvision's transforms.v2 has the operation
(gaussian blur, contrast, erasing), it is used, JPEG is Pillow's codec; the rest is a few
lines of tensor math.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

Corruption = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]  # float [0,1] -> float [0,1]
CORRUPTIONS: dict[str, Corruption] = {}
SEVERITIES = (1, 2, 3, 4, 5)
CHUNK = 500  # images corrupted and run at a time: bounds memory at phone resolutions


def corruption(name: str):
    def deco(fn: Corruption) -> Corruption:
        CORRUPTIONS[name] = fn
        return fn

    return deco


def _scale(x: torch.Tensor) -> float:
    return x.shape[-1] / 32.0


def _depthwise(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    k = (kernel / kernel.sum()).to(x.dtype)
    pad = (k.shape[-1] // 2, k.shape[-1] // 2, k.shape[-2] // 2, k.shape[-2] // 2)
    return F.conv2d(F.pad(x, pad, mode="reflect"), k.expand(x.shape[1], 1, *k.shape), groups=x.shape[1])


@corruption("gaussian_noise")
def gaussian_noise(x, s, gen):
    sigma = (0.04, 0.06, 0.08, 0.09, 0.10)[s - 1]
    return x + sigma * torch.randn(x.shape, generator=gen)


@corruption("shot_noise")
def shot_noise(x, s, gen):
    lam = (500.0, 250.0, 100.0, 75.0, 50.0)[s - 1]  # photons per unit intensity
    return torch.poisson(x * lam, generator=gen) / lam


@corruption("gaussian_blur")
def gaussian_blur(x, s, gen):
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[s - 1] * _scale(x)
    k = 2 * math.ceil(3 * sigma) + 1
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


@corruption("defocus_blur")
def defocus_blur(x, s, gen):
    """An aliased disk (the out-of-focus lens), softened by a small gaussian, as CIFAR-10-C builds it."""
    radius, alias = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))[s - 1]
    radius, alias = radius * _scale(x), alias * _scale(x)
    half = max(1, math.ceil(radius))
    r = torch.arange(-half, half + 1, dtype=torch.float32)
    disk = ((r[None, :] ** 2 + r[:, None] ** 2) <= radius**2).float()
    disk = TF.gaussian_blur(disk[None, None], [2 * half + 1] * 2, [alias, alias])[0, 0]
    return _depthwise(x, disk)


@corruption("motion_blur")
def motion_blur(x, s, gen):
    """A straight camera shake: a line kernel of the severity's length at a random angle."""
    length = (3.0, 4.0, 5.0, 6.0, 8.0)[s - 1] * _scale(x)
    angle = (torch.rand((), generator=gen).item() - 0.5) * math.pi / 2
    half = math.ceil(length / 2)
    kernel = torch.zeros(2 * half + 1, 2 * half + 1)
    for t in torch.linspace(-length / 2, length / 2, int(4 * length) + 1):
        kernel[half + round(float(t) * math.sin(angle)), half + round(float(t) * math.cos(angle))] += 1
    return _depthwise(x, kernel)


@corruption("contrast")
def contrast(x, s, gen):
    return TF.adjust_contrast(x, (0.75, 0.5, 0.4, 0.3, 0.15)[s - 1])


@corruption("brightness")
def brightness(x, s, gen):
    """CIFAR-10-C adds c to the HSV value channel; with hue and saturation fixed that scales RGB by (V+c)/V."""
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[s - 1]
    v = x.amax(1, keepdim=True)
    return x * ((v + c).clamp(max=1.0) / v.clamp(min=1e-6))


@corruption("jpeg")
def jpeg(x, s, gen):
    """Real JPEG round trips through Pillow (torchvision.io's codecs are deprecated since 0.29)."""
    import io

    from PIL import Image

    q = (80, 65, 58, 50, 40)[s - 1]
    out = []
    for img in _to_uint8(x).permute(0, 2, 3, 1).numpy():
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=q)
        out.append(torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).float() / 255.0


@corruption("pixelate")
def pixelate(x, s, gen):
    f = (0.95, 0.9, 0.85, 0.75, 0.65)[s - 1]
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, int(h * f)), max(1, int(w * f))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


@corruption("occlusion")
def occlusion(x, s, gen):
    """Random erasing: a rectangle of the severity's area fraction, filled with noise, per image."""
    area = (0.05, 0.1, 0.15, 0.2, 0.3)[s - 1]
    n, _, h, w = x.shape
    out = x.clone()
    for i in range(n):
        aspect = math.exp((torch.rand((), generator=gen).item() - 0.5) * math.log(3.0))  # 1/sqrt(3) .. sqrt(3)
        eh = min(h, max(1, round(math.sqrt(area * h * w * aspect))))
        ew = min(w, max(1, round(math.sqrt(area * h * w / aspect))))
        top = int(torch.randint(0, h - eh + 1, (), generator=gen))
        left = int(torch.randint(0, w - ew + 1, (), generator=gen))
        out[i] = TF.erase(out[i], top, left, eh, ew, torch.rand((3, eh, ew), generator=gen))
    return out


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """A uint8 N x 3 x H x W batch with corruption `name` at `severity`, as uint8 (what a camera
    pipeline would hand the model). The same inputs and seed give the same pixels."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r} (known: {', '.join(CORRUPTIONS)})")
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity} outside 1..5")
    gen = torch.Generator().manual_seed(seed * 1000 + list(CORRUPTIONS).index(name) * 10 + severity)
    return _to_uint8(CORRUPTIONS[name](images.float() / 255.0, severity, gen))


def corrupted_chunks(images: torch.Tensor, name: str, severity: int, seed: int = 0,
                     chunk: int = CHUNK) -> Iterator[torch.Tensor]:
    """`corrupt` over a large split chunk by chunk (each chunk seeded apart), bounding memory."""
    for i, s in enumerate(range(0, len(images), chunk)):
        yield corrupt(images[s : s + chunk], name, severity, seed * 100_003 + i)


def evaluate_robustness(runners: dict[str, Callable[[np.ndarray], np.ndarray]], images: torch.Tensor,
                        labels: np.ndarray, normalize: Callable[[torch.Tensor], torch.Tensor], corruptions: list[str],
                        severities: list[int], seed: int = 0, progress=None) -> dict[str, dict]:
    """Top-1 (%) of every runner on every corruption and severity; each corrupted chunk is made
    once and run by all runners. Returns {variant: {"clean_top1", "by_corruption": {c: {sev: top1}},
    "corruption_top1" (mean over all), "by_severity": {sev: mean over corruptions}}}."""

    hits = {v: {c: {s: 0 for s in severities} for c in corruptions} for v in runners}
    clean = {v: 0 for v in runners}
    for s0 in range(0, len(images), CHUNK):
        x = normalize(images[s0 : s0 + CHUNK]).numpy()
        for v, run in runners.items():
            clean[v] += int((run(x).argmax(1) == labels[s0 : s0 + CHUNK]).sum())
    for c in corruptions:
        for s in severities:
            start = 0
            for xc in corrupted_chunks(images, c, s, seed):
                x = normalize(xc).numpy()
                y = labels[start : start + len(xc)]
                for v, run in runners.items():
                    hits[v][c][s] += int((run(x).argmax(1) == y).sum())
                start += len(xc)
            if progress:
                progress(1)
    n = len(labels)
    out = {}
    for v in runners:
        by = {c: {s: round(100.0 * hits[v][c][s] / n, 3) for s in severities} for c in corruptions}
        allv = [a for d in by.values() for a in d.values()]
        out[v] = {"clean_top1": round(100.0 * clean[v] / n, 3), "corruption_top1": round(float(np.mean(allv)), 3),
                  "by_corruption": by,
                  "by_severity": {s: round(float(np.mean([by[c][s] for c in corruptions])), 3) for s in severities},
                  "images": n}
    return out


def cached_robustness(files: dict[str, Path], run: Callable[[Path, np.ndarray], np.ndarray], images: torch.Tensor,
                      labels: np.ndarray, normalize: Callable[[torch.Tensor], torch.Tensor], corruptions: list[str],
                      severities: list[int], seed: int, cache: Path | None, images_key: str, runtime: str,
                      progress=None) -> dict[str, dict]:
    """`evaluate_robustness` of model files (variant -> file, run by `run(file, batch)`), where a
    file's figures for the same images, corruptions, severities and seed are taken from `cache`
    (an earlier run's) instead of being measured again: the teacher's file is the same every run
    and the one that costs most (its ResNet-50 forward over every corrupted image). Keyed on the
    file's bytes, the images, this module's code, `runtime` (what `run` runs the files on, with its
    version) and the CPU's ISA (int8 kernels round differently per CPU class)."""
    from .bench.machine import machine_info
    from .fileio import sha256_file, sha256_json, write_json

    paths: dict[str, Path] = {}
    if cache:
        # what every file's figures depend on besides its own bytes, computed once
        same = [images_key, list(images.shape), corruptions, severities, seed, sha256_file(__file__), runtime,
                machine_info()["isa"]]
        paths = {v: cache / "robustness" / f"{sha256_json([sha256_file(p), *same])[:32]}.json" for v, p in files.items()}
    known = {v: r for v, p in paths.items() if (r := _read_figures(p)) is not None}
    todo = {v: (lambda x, p=p: run(p, x)) for v, p in files.items() if v not in known}
    measured = evaluate_robustness(todo, images, labels, normalize, corruptions, severities, seed, progress) if todo else {}
    for v, r in measured.items():
        if v in paths:
            write_json(paths[v], r)
    return {v: known[v] if v in known else measured[v] for v in files}


def _read_figures(path: Path) -> dict | None:
    """A cached result with its severities as numbers again (JSON keys are strings), or None."""
    import json

    try:
        r = json.loads(path.read_text())
        r["by_corruption"] = {c: {int(s): a for s, a in by.items()} for c, by in r["by_corruption"].items()}
        r["by_severity"] = {int(s): a for s, a in r["by_severity"].items()}
        return {**r, "cached": True}
    except (OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
