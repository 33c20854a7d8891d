"""The shared training loop: resume from the last epoch after an interruption."""

from __future__ import annotations

import pytest
import torch

from edgekd.models import build
from edgekd.train import TrainConfig, fit
from test_compress import tiny_data


class Stop(Exception):
    pass


def test_fit_resumes_from_last_completed_epoch(tmp_path):
    data = tiny_data(32)
    cfg = TrainConfig(epochs=3, loss="ce", lr=0.01, eval_every=0)
    spec = {"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25}
    torch.manual_seed(0)
    ref_model = build(spec)
    init = {k: v.clone() for k, v in ref_model.state_dict().items()}
    ref = fit(ref_model, data, cfg, torch.device("cpu"), seed=0)

    model = build(spec)
    model.load_state_dict(init)
    state = tmp_path / "state.pt"

    def stop_after_first(rec):
        if rec["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        fit(model, data, cfg, torch.device("cpu"), seed=0, state_path=state, on_epoch=stop_after_first)
    model2 = build(spec)  # a fresh process would rebuild the model
    hist = fit(model2, data, cfg, torch.device("cpu"), seed=0, state_path=state)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    assert hist[-1]["loss"] == pytest.approx(ref[-1]["loss"], rel=1e-4)


def test_kd_loss_requires_a_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(build({"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25}),
            tiny_data(8), TrainConfig(epochs=1, loss="kd"), torch.device("cpu"), seed=0)


def test_recalibrate_bn_replaces_stale_statistics_with_the_data_mean():
    from edgekd.train import recalibrate_bn

    data = tiny_data(n=64)
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4, momentum=0.1)
    model = torch.nn.Sequential(conv, bn).eval()
    bn.running_mean.fill_(100.0)  # stale, as after channels were removed upstream
    recalibrate_bn(model, data, torch.device("cpu"), images=64, seed=0)
    with torch.no_grad():
        feats = conv(data.normalize(data.train.images))
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1 and not model.training  # restored
