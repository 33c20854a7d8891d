"""timm models as students and teachers (`arch: timm/<name>`): validated like torchvision
architectures, built offline (timm's tiny test models need no download), pruned with
torch-pruning and rebuilt from the pruning history, BatchNorm folded without losing the
activation timm fuses into it, and through QAT to an int8 ONNX file that agrees with the
fake-quant model. Skipped where the [timm] extra is not installed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("timm")

from edgekd.config import validate  # noqa: E402
from edgekd.errors import ConfigError, InputError  # noqa: E402
from edgekd.metrics import count_macs  # noqa: E402
from edgekd.models import build, rebuild, save_checkpoint  # noqa: E402
from edgekd.onnx_export import export_onnx, verify  # noqa: E402
from edgekd.pruning import make_pruner, pruning_history, resolve_ignored  # noqa: E402
from edgekd.quant.ptq import quantize_onnx  # noqa: E402
from edgekd.quant.qat import apply_transform, snap_weights  # noqa: E402
from test_compress import _ort_optimized_ops, tiny_data  # noqa: E402

SPEC = {"arch": "timm/test_efficientnet", "num_classes": 4, "cifar_stem": True, "width_mult": None}


def test_timm_architectures_are_validated_by_name(minimal_pipeline):
    minimal_pipeline["student"] = {"arch": "timm/test_efficientnet", "cifar_stem": True}
    minimal_pipeline["teacher"] = {"arch": "timm/test_resnet"}
    validate(minimal_pipeline)
    for key, model, want in [
        ("student", {"arch": "timm/test_eficientnet"},
         "student.arch: unknown architecture 'timm/test_eficientnet' (did you mean 'test_efficientnet'"),
        ("student", {"arch": "timm/test_efficientnet", "width_mult": 0.5}, "student.width_mult: only for torchvision models"),
        ("teacher", {"arch": "timm/nosuchnet"}, "teacher.arch: unknown architecture 'timm/nosuchnet'"),
    ]:
        p = copy.deepcopy(minimal_pipeline)
        p[key] = model
        with pytest.raises(ConfigError) as info:
            validate(p)
        assert str(info.value).startswith(want), str(info.value)
    with pytest.raises(InputError, match="width_mult is for torchvision models"):
        build({**SPEC, "width_mult": 0.5})


def test_a_timm_model_builds_offline_with_the_small_image_stem():
    x = torch.randn(2, 3, 32, 32)
    plain, small = build({**SPEC, "cifar_stem": False}).eval(), build(SPEC).eval()
    assert plain(x).shape == small(x).shape == (2, 4)
    assert count_macs(small, 32) > 3 * count_macs(plain, 32)  # the stem no longer halves the input


def test_a_pruned_timm_model_is_smaller_and_rebuilds_from_its_history(tmp_path):
    torch.manual_seed(0)
    model = build(SPEC)
    m0 = count_macs(model, 32)
    pruner = make_pruner(model, 32, "l2", 0.9, 20, False, 8, resolve_ignored(model, [], 4))
    while count_macs(model, 32) > 0.7 * m0:
        pruner.step()
    save_checkpoint(tmp_path / "m.pt", model, SPEC, pruning_history(pruner), [], {"image_size": 32})
    again = rebuild(torch.load(tmp_path / "m.pt", weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.eval()(x), again.eval()(x), atol=1e-5)
    assert count_macs(again, 32) <= 0.7 * m0


def test_folding_keeps_the_activation_timm_fuses_into_its_batchnorm():
    torch.manual_seed(0)
    model = build(SPEC).train()
    x = torch.randn(16, 3, 32, 32)
    for _ in range(3):  # BatchNorm statistics that are not the identity
        model(x)
    model.eval()
    folded = apply_transform(copy.deepcopy(model), "fold_bn")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), model(x), atol=1e-4)


def test_a_timm_student_goes_through_qat_to_an_int8_file_that_agrees(tmp_path):
    from edgekd.train import TrainConfig, fit

    data = tiny_data()
    q = apply_transform(apply_transform(build(SPEC).eval(), "fold_bn"), "qat")
    hist = fit(q, data, TrainConfig(epochs=2, loss="ce", lr=0.01, eval_every=0), torch.device("cpu"), seed=0)
    assert np.isfinite(hist[-1]["loss"])
    q.eval()
    snapped = export_onnx(snap_weights(copy.deepcopy(q)), tmp_path / "snap.onnx", 32)
    int8 = quantize_onnx(snapped, tmp_path / "int8.onnx", data.normalize(data.train.images[:32]).numpy())
    assert _ort_optimized_ops(int8, tmp_path).get("QLinearConv", 0) >= 5
    res = verify(int8, q, data, n=64, max_abs=None, min_agreement=0.5)
    assert res["top1_agreement"] >= 0.5
