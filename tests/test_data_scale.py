"""Datasets larger than memory: a decoded split over the RAM threshold is memory-mapped, a
subset or validation split of it is a list of rows (not a copy of its pixels), training reads
only the batches it uses, and a decode that does not finish leaves nothing that is read as a
cache. The threshold is lowered here so a small synthetic folder stands in for a large one."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import _make_image_folder
from edgekd import data as data_mod
from edgekd.data import MappedImages, load_data
from edgekd.errors import EdgekdError, InputError
from edgekd.models import build
from edgekd.schema import DataConfig
from edgekd.train import TrainConfig, fit

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def rss_anon_bytes() -> int:
    """Memory the process itself holds: not the mapped file's pages, which are the kernel's page
    cache (dropped and re-read under memory pressure), whatever its read-ahead maps in."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def config(folder, cache, **kw) -> DataConfig:
    return DataConfig(source=str(folder), cache_dir=str(cache), **kw)


@pytest.fixture
def big_folder(tmp_path):
    """2 classes x 1200 tiny images, decoded at 160 px: 184 MB of pixels once decoded."""
    return _make_image_folder(tmp_path / "big", size=12, train_counts={"ant": 1200, "moose": 1200},
                              test_counts={"ant": 20, "moose": 20})


@linux_only
def test_a_split_over_the_threshold_is_mapped_and_training_reads_only_its_batches(big_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "map_above_bytes", lambda: 1 << 20)
    cfg = config(big_folder, tmp_path / "cache", image_size=160, subset=256, val_split=0.25, batch_size=16,
                 eval_batch_size=16, augment="crop_flip")
    train = TrainConfig(epochs=1, loss="ce", lr=0.01, eval_every=1, bn_recalibration="off")
    model = build({"arch": "mobilenet_v2", "num_classes": 2, "cifar_stem": False, "width_mult": 0.25})
    warm = load_data(cfg.model_copy(update={"subset": 64}), seed=0)  # decode once; the allocator's working set
    warm.train.images, warm.val.images = warm.train.images[:], warm.val.images[:]  # in RAM
    fit(model, warm, train, torch.device("cpu"), seed=0)
    del warm
    before = rss_anon_bytes()
    whole = load_data(cfg.model_copy(update={"subset": None}), seed=0)  # read into RAM, this would be +176 MB
    assert isinstance(whole.train.images, MappedImages)
    assert rss_anon_bytes() - before < whole.train.images.base.numel() / 10
    data = load_data(cfg, seed=0)
    assert isinstance(data.train.images, MappedImages) and isinstance(data.val.images, MappedImages)
    full = data.train.images.base
    assert full.shape == (2400, 3, 160, 160) and data.train.images.shape == (192, 3, 160, 160)
    assert len(data.val) == 64 and not set(data.val.images.rows.tolist()) & set(data.train.images.rows.tolist())
    assert torch.equal(data.train.images[:5], full[data.train.images.rows[:5]])
    hist = fit(model, data, train, torch.device("cpu"), seed=0)
    assert np.isfinite(hist[-1]["loss"])
    grown = rss_anon_bytes() - before
    assert grown < full.numel() / 2, f"process memory grew by {grown / 2**20:.0f} MB for a {full.numel() / 2**20:.0f} MB dataset"


def test_a_split_under_the_threshold_is_read_into_memory(image_folder, tmp_path):
    data = load_data(config(image_folder, tmp_path / "cache", image_size=8), seed=0)
    assert isinstance(data.train.images, torch.Tensor) and data.train.images.dtype == torch.uint8


def test_a_decode_that_does_not_finish_leaves_nothing_read_as_a_cache(image_folder, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (image_folder / "train" / "ant" / "img_9.jpg").write_bytes(b"not a jpeg")  # fails after the others decoded
    with pytest.raises(InputError, match="unreadable image"):
        load_data(config(image_folder, cache, image_size=8), seed=0)
    assert not any((cache / "tensors").glob("*.u8")) and not any((cache / "tensors").glob("*.meta.pt"))
    assert not any((cache / "tensors").glob(".*.tmp"))  # nor its temporary file
    (image_folder / "train" / "ant" / "img_9.jpg").unlink()
    # a pixel file without its metadata (a process killed between the two) is decoded again
    first = load_data(config(image_folder, cache, image_size=8), seed=0)
    meta = cache / "tensors" / f"{first.train.key[:32]}.meta.pt"
    meta.unlink()
    decoded = []
    real = data_mod._decode
    monkeypatch.setattr(data_mod, "_decode", lambda job: decoded.append(job) or real(job))
    monkeypatch.setattr(data_mod, "ProcessPoolExecutor", _Serial)
    again = load_data(config(image_folder, cache, image_size=8), seed=0)
    assert decoded and meta.exists() and torch.equal(again.train.images, first.train.images)


class _Serial:
    """ProcessPoolExecutor's map, in this process (so a patched decode is seen)."""

    def __init__(self, *_):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, fn, jobs, chunksize=1):
        return map(fn, jobs)


# ----------------------------------------------------------------------------- stored larger than the input


def test_images_keep_their_aspect_ratio_short_side_and_centre_crop(make_image_folder, tmp_path):
    from PIL import Image

    from conftest import write_image

    root = make_image_folder()
    wide = np.random.default_rng(1).integers(0, 256, (20, 40, 3), dtype=np.uint8)  # H 20, W 40
    write_image(root / "train" / "ant" / "img_90.png", wide)
    data = load_data(config(root, tmp_path / "cache", image_size=10), seed=0)
    i = int(np.flatnonzero([l == 0 for l in data.train.labels.tolist()])[-1])  # the last 'ant' file sorts last
    with Image.open(root / "train" / "ant" / "img_90.png") as im:
        expected = np.asarray(im.resize((20, 10), Image.BILINEAR)).transpose(2, 0, 1)[:, :, 5:15]
    assert np.array_equal(data.train.images[i].numpy(), expected)  # not squashed to 10 x 10


def test_store_size_trains_on_crops_of_the_stored_image_and_evaluates_its_centre(image_folder, tmp_path, monkeypatch):
    cfg = config(image_folder, tmp_path / "cache", image_size=8, store_size=12, batch_size=4)
    data = load_data(cfg, seed=0)
    whole = load_data(config(image_folder, tmp_path / "cache", image_size=12), seed=0)  # the same stored pixels
    assert data.image_size == 8 and data.train.full.shape[-1] == 12 and data.test.images.shape[-1] == 8
    assert torch.equal(data.train.full[:], whole.train.images[:])
    assert torch.equal(data.test.images[:], whole.test.images[:, :, 2:10, 2:10])  # evaluation: the centre crop
    gen = torch.Generator().manual_seed(0)
    for x, _, idx, flip in data_mod.iterate(data.train, 4, shuffle=True, augment="crop_flip", gen=gen):
        assert x.shape[-2:] == (8, 8)
        for xi, i, f in zip(x, idx, flip):  # an unpadded 8 x 8 window of the 12 x 12 stored image
            src = whole.train.images[i].float()
            wins = [src[:, y:y + 8, z:z + 8] for y in range(5) for z in range(5)]
            assert any(torch.equal(xi.flip(-1) if f else xi, w) for w in wins)
    x, *_ = next(data_mod.iterate(data.train, 4, True, "resized_crop_flip", gen))
    assert x.shape[-2:] == (8, 8)
    sub = load_data(cfg.model_copy(update={"val_split": 0.25}), seed=0)  # selections keep both views
    assert sub.val.images.shape[-1] == 8 and sub.val.full.shape[-1] == 12
    monkeypatch.setattr(data_mod, "map_above_bytes", lambda: 0)  # and so does a memory-mapped split
    mapped = load_data(cfg.model_copy(update={"val_split": 0.25}), seed=0)
    assert isinstance(mapped.train.images, MappedImages) and mapped.train.images.shape[-1] == 8
    assert torch.equal(mapped.val.images[:], sub.val.images[:]) and torch.equal(mapped.train.full[:], sub.train.full[:])
    model = build({"arch": "mobilenet_v2", "num_classes": 3, "cifar_stem": True, "width_mult": 0.25})
    hist = fit(model, mapped, TrainConfig(epochs=1, loss="ce", bn_recalibration="off"), torch.device("cpu"), seed=0)
    assert np.isfinite(hist[-1]["loss"]) and "val_top1" in hist[-1]


def test_a_store_size_below_the_image_size_is_refused(write_pipeline, minimal_pipeline):
    from edgekd.config import load_pipeline
    from edgekd.errors import ConfigError

    minimal_pipeline["data"].update(image_size=32, store_size=24)
    with pytest.raises(ConfigError, match=r"^data: .*store_size \(24\) must be at least image_size \(32\)"):
        load_pipeline(write_pipeline(minimal_pipeline))


# ----------------------------------------------------------------------------- a full disk


def test_a_cache_the_disk_cannot_hold_is_refused_before_decoding(image_folder, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(data_mod.shutil, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1000))
    monkeypatch.setattr(data_mod, "_decode", lambda job: pytest.fail("decoded although the disk cannot hold it"))
    with pytest.raises(EdgekdError, match=r"decoded images need 2,304 bytes but 1,000 are free; .*data.cache_dir"):
        load_data(config(image_folder, tmp_path / "cache", image_size=8), seed=0)


def test_a_disk_that_fills_while_decoding_leaves_no_cache(image_folder, tmp_path, monkeypatch):
    import builtins
    import errno

    cache = tmp_path / "cache"

    class Full:
        """A file whose disk fills after its first image."""

        def __init__(self, f):
            self.f, self.n = f, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, b):
            self.n += 1
            if self.n > 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(data_mod, "open", lambda *a, **k: Full(builtins.open(*a, **k)), raising=False)
    monkeypatch.setattr(data_mod, "ProcessPoolExecutor", _Serial)
    with pytest.raises(EdgekdError, match=r"cannot write .*No space left on device"):
        load_data(config(image_folder, cache, image_size=8), seed=0)
    assert not [p for p in (cache / "tensors").iterdir()]  # no pixels, no metadata, no temporary file
    monkeypatch.undo()
    data = load_data(config(image_folder, cache, image_size=8), seed=0)  # the next run decodes it whole
    assert len(data.train) == 12
