"""Shared fixtures for the edgekd unit tests.

* every test session gets its own EDGEKD_CACHE (a tmp dir), so no cache ever lands in ~/.cache;
* `make_image_folder` writes a tiny ImageFolder (train/ and test/, 3 classes, random pixels)
  with Pillow; `image_folder` is one ready-made copy of it;
* `write_pipeline` dumps a pipeline mapping (or raw text) to a YAML file;
  `minimal_pipeline` is the smallest valid pipeline (one `distill` stage).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import yaml

# Class folders are created in this (unsorted) order; ImageFolder order must be sorted.
CLASSES_CREATION_ORDER = ("zebra", "ant", "moose")
CLASSES = sorted(CLASSES_CREATION_ORDER)  # ["ant", "moose", "zebra"]
TRAIN_COUNTS = {"ant": 6, "moose": 4, "zebra": 2}  # deliberately unbalanced (12 images)
TEST_COUNTS = {"ant": 2, "moose": 2, "zebra": 2}  # 6 images


@pytest.fixture(scope="session", autouse=True)
def _edgekd_cache(tmp_path_factory) -> Path:
    """Point EDGEKD_CACHE at a per-session tmp dir for the whole test session."""
    cache = tmp_path_factory.mktemp("edgekd_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEKD_CACHE", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def _torch_threads():
    """Keep torch to the 2 cores of the test machine and deterministic per test."""
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    yield


def write_image(path: Path, pixels: np.ndarray) -> None:
    """Write an HxWx3 uint8 array as an image; the format follows the suffix (.png/.jpg)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode="RGB").save(path)


def _make_image_folder(root: Path, size: int = 8, seed: int = 0,
                       train_counts: dict[str, int] | None = None,
                       test_counts: dict[str, int] | None = None,
                       test_name: str = "test") -> Path:
    """root/{train,<test_name>}/<class>/img_<i>.<png|jpg> with random pixels.

    Even-numbered images are PNG (lossless, so decoded pixels can be compared exactly),
    odd-numbered ones JPEG. Returns root."""
    rng = np.random.default_rng(seed)
    train_counts = TRAIN_COUNTS if train_counts is None else train_counts
    test_counts = TEST_COUNTS if test_counts is None else test_counts
    for split, counts in (("train", train_counts), (test_name, test_counts)):
        for cls in CLASSES_CREATION_ORDER:
            if cls not in counts:
                continue
            for i in range(counts[cls]):
                ext = "png" if i % 2 == 0 else "jpg"
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                write_image(root / split / cls / f"img_{i}.{ext}", pixels)
    return root


@pytest.fixture
def make_image_folder(tmp_path) -> Callable[..., Path]:
    """Factory: make_image_folder(name="ds", size=8, seed=0, ...) -> path of a fresh ImageFolder."""

    def make(name: str = "ds", **kw: Any) -> Path:
        return _make_image_folder(tmp_path / name, **kw)

    return make


@pytest.fixture
def image_folder(make_image_folder) -> Path:
    """A fresh 8x8 ImageFolder: train (ant 6, moose 4, zebra 2) and test (2 each)."""
    return make_image_folder()


@pytest.fixture
def write_pipeline(tmp_path) -> Callable[..., Path]:
    """Factory: write_pipeline(mapping_or_text, name="pipeline.yaml") -> path of the YAML file."""

    def write(content: dict | str, name: str = "pipeline.yaml") -> Path:
        path = tmp_path / name
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def minimal_pipeline(image_folder) -> dict:
    """The smallest valid pipeline mapping (a fresh deep copy per test)."""
    return copy.deepcopy({
        "name": "unit",
        "data": {"source": str(image_folder)},
        "student": {"arch": "mobilenet_v2", "cifar_stem": True, "width_mult": 0.25},
        "teacher": {"arch": "resnet18", "cifar_stem": True},
        "stages": [{"distill": {"epochs": 1}}],
    })


@pytest.fixture(scope="session")
def tiny():
    """A MobileNetV2 x0.25 on 16 px, 4 classes, with BN statistics of its 48 random images and
    decided logits: the model every format is exported from in the format tests."""
    import torch

    from edgekd.schema import DataConfig
    from edgekd.data import Data, Split
    from edgekd.models import build

    torch.manual_seed(0)
    m = build({"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25})
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8, generator=g)
    split = Split(imgs, torch.arange(48) % 4, ["a", "b", "c", "d"], "k")
    cfg = DataConfig(source="x")
    data = Data(split, split, None, cfg.mean, cfg.std, "none", 16, 16)
    with torch.no_grad():  # BN statistics of the data and O(1) logits, so top-1 is decided
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = None
        m.train()(data.normalize(imgs))
        torch.nn.init.normal_(m.classifier[-1].weight, std=1.0)
    return m.eval(), data


@pytest.fixture(scope="session")
def tiny_trained(tiny):
    """`tiny` fit to its 48 images' labels for a few steps: logits that decide most images by a
    margin int8 rounding does not flip (a random network's barely do), for int8 verification."""
    import copy

    import torch

    model, data = tiny
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.momentum = 0.1
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    x, y = data.normalize(data.train.images), data.train.labels
    torch.manual_seed(0)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval(), data
