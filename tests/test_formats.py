"""The format registry (issue 15's redesign): every installed format takes a tiny model through
export, metadata round trip, its runner and verification; the export stage's format options."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.config import DataConfig
from edgekd.data import Data, Split
from edgekd.errors import EdgekdError
from edgekd.formats import FORMATS, Variant, enabled_formats
from edgekd.formats.base import ExportJob
from edgekd.models import build
from edgekd.onnx_export import metadata
from edgekd.stages.export import ExportConfig

INSTALLED = [n for n in FORMATS.names() if FORMATS.get(n).available() is None]


@pytest.fixture(scope="module")
def tiny():
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


def test_the_registry_lists_onnx_and_executorch_and_onnx_is_primary():
    assert {"onnx", "executorch"} <= set(FORMATS.names())
    assert [n for n in FORMATS.names() if FORMATS.get(n).primary] == ["onnx"]


@pytest.mark.parametrize("name", INSTALLED)
def test_a_tiny_model_through_every_installed_format(tiny, tmp_path, name):
    model, data = tiny
    fmt = FORMATS.get(name)()
    job = ExportJob(data, 17, 48, 0.5, lambda: data.normalize(data.train.images[:16]).numpy())
    v = Variant("student_fp32", model, max_abs=1e-3, min_agreement=0.99)
    path = fmt.export(v, tmp_path / f"m{fmt.suffix}", job)
    fmt.write_metadata(path, metadata(data, v.name))
    fmt.write_metadata(path, {"edgekd.temperature": "1.5"})  # merges, as calibration adds its key later
    meta = fmt.read_metadata(path)
    assert meta["edgekd.classes"] == '["a", "b", "c", "d"]' and meta["edgekd.temperature"] == "1.5"
    x = data.normalize(data.test.images[:8]).numpy()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(fmt.runner(path)(x) - ref).max() < 1e-3
    check = fmt.verify(path, v, job)
    assert check["max_abs_diff"] < 1e-3 and check["top1_agreement"] == 1.0


def test_unknown_format_is_a_one_line_error_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown format 'tflit'.*known: executorch, onnx"):
        ExportConfig(formats=["tflit"])


def test_a_format_list_always_includes_onnx_the_reference_format():
    assert ExportConfig(formats=["executorch"]).formats == ["onnx", "executorch"]
    assert ExportConfig().formats == "auto"


def test_executorch_switch_still_decides_under_auto():
    got, _ = enabled_formats("auto", "off")
    assert [f.key for f in got] == ["onnx"]
    if FORMATS.get("executorch").available() is None:
        got, _ = enabled_formats("auto", "auto")
        assert [f.key for f in got] == ["onnx", "pte"]  # the primary format first


def test_a_listed_format_that_is_not_installed_is_an_error(monkeypatch):
    monkeypatch.setattr(FORMATS.get("executorch"), "available", classmethod(lambda cls: "not installed (hint)"))
    with pytest.raises(EdgekdError, match=r"export.formats: executorch is not installed \(hint\)"):
        enabled_formats(["onnx", "executorch"], "auto")
    got, skipped = enabled_formats("auto", "auto")
    assert [f.key for f in got] == ["onnx"] and skipped == {"executorch": "not installed (hint)"}
