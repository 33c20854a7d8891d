"""Forward passes in the layout and runtime that pay (edgekd.inference): the speed-ups change
rounding only, never which model runs or what it computes."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgekd import inference
from edgekd.inference import channels_last, frozen_forward, predict

CPU = torch.device("cpu")


def _is_cl(model: nn.Module) -> bool:
    w = next(p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1)
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_channels_last_lasts_for_the_outermost_block_only(tiny):
    model = copy.deepcopy(tiny[0])
    with channels_last(CPU, model):
        assert _is_cl(model)
        with channels_last(CPU, model):  # predict inside a training run
            pass
        assert _is_cl(model), "an inner block must not switch the model back"
    assert not _is_cl(model) and all(p.is_contiguous() for p in model.parameters())
    with channels_last(torch.device("cuda"), model):  # bf16 convolutions on a GPU run NHWC too
        assert _is_cl(model)
    assert not _is_cl(model)
    with channels_last(torch.device("mps"), model):  # not measured there: left alone
        assert not _is_cl(model)


def test_channels_last_changes_rounding_only(tiny):
    model, data = tiny
    x = data.normalize(data.test.images[:16])
    with torch.no_grad():
        want = model(x)
        with channels_last(CPU, model):
            got = model(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_frozen_model_runs_in_onnxruntime_with_pytorchs_logits(tiny):
    pytest.importorskip("onnxruntime")
    model, data = tiny
    model = copy.deepcopy(model)
    x = data.normalize(data.test.images[:32])
    run = frozen_forward(model, CPU, x[:8])
    assert inference._runners[model] is not None, "onnxruntime should take a MobileNetV2"
    assert frozen_forward(model, CPU, x[:8]) is run, "exported once per model"
    with torch.no_grad():
        want = model(x)
    tol = inference.ORT_MATCH * float(want.abs().max())  # float rounding of another runtime's kernels
    assert torch.allclose(run(x), want, atol=tol, rtol=0)
    assert np.allclose(predict(model, data, data.test, CPU, frozen=True), predict(model, data, data.test, CPU), atol=tol, rtol=0)


class _NotExportable(nn.Module):
    """A forward the ONNX exporter cannot trace (a NumPy round trip)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return torch.from_numpy(y.detach().numpy() * 2.0)


def test_a_model_onnxruntime_cannot_take_runs_in_pytorch(caplog):
    model = _NotExportable().eval()
    x = torch.randn(4, 3, 8, 8)
    with caplog.at_level("INFO", logger="edgekd"):
        run = frozen_forward(model, CPU, x)
    assert inference._runners[model] is None
    assert "runs in PyTorch" in caplog.text
    with torch.no_grad():
        assert torch.allclose(run(x), model(x), atol=1e-5)  # PyTorch, in the layout that pays


def test_the_same_weights_on_the_same_split_are_evaluated_once(tiny):
    """A training run's last evaluation and the stage's measurement of the same weights are one
    pass (predict keeps the last logits by evaluation_key); changed weights or BN statistics, a
    frozen model and a call made by a whole torchrun group run again."""
    model = copy.deepcopy(tiny[0])
    data = tiny[1]
    passes = []
    model.register_forward_hook(lambda *a: passes.append(1))
    first = predict(model, data, data.test, CPU, together=True)  # as the training loop calls it
    n = len(passes)
    again = predict(model, data, data.test, CPU)  # as the stage measures it
    assert len(passes) == n and np.array_equal(first, again)
    again[:] = 0  # the caller's copy: the kept logits stay as they were
    assert np.array_equal(predict(model, data, data.test, CPU), first) and len(passes) == n
    predict(model, data, data.test, CPU, together=True)  # a group call never reads them
    assert len(passes) == 2 * n
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    bn.running_var.mul_(2.0)  # BatchNorm re-estimated: other logits
    changed = predict(model, data, data.test, CPU)
    assert len(passes) == 3 * n and not np.allclose(changed, first)
    predict(model, data, data.test, CPU, frozen=True)  # a teacher (its own cache): computed, if only the
    assert len(passes) > 3 * n  # probe that checks onnxruntime against PyTorch
