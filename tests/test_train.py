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


@pytest.mark.parametrize("arch", ["mobilenet_v2", "mobilenet_v3_small"])
def test_activations_run_out_of_place_in_training_to_the_same_weights_and_are_put_back(arch, monkeypatch):
    """fit() trains with ReLU6 / Hardswish / Hardsigmoid out of place (in place they copy their
    input first): the same weights to the bit as in place, and the model's flags as they were."""
    import contextlib

    from edgekd import train

    data = tiny_data(32)
    cfg = TrainConfig(epochs=2, loss="ce", lr=0.05, eval_every=0)
    torch.manual_seed(0)
    init = build({"arch": arch, "num_classes": 4, "cifar_stem": True, "width_mult": 0.25})
    flags = lambda m: [(n, m.inplace) for n, m in m.named_modules() if isinstance(m, train.COPYING_IN_PLACE)]  # noqa: E731
    assert any(inplace for _, inplace in flags(init))  # torchvision builds most in place
    seen, weights = [], []
    for out_of_place in (True, False):
        if not out_of_place:
            monkeypatch.setattr(train, "_activations_out_of_place", lambda model: contextlib.nullcontext())
        model = build({"arch": arch, "num_classes": 4, "cifar_stem": True, "width_mult": 0.25})
        model.load_state_dict(init.state_dict())
        model.register_forward_pre_hook(lambda m, a: seen.append(flags(m)) if m.training and len(seen) < 1 else None)
        fit(model, data, cfg, torch.device("cpu"), seed=0)
        assert flags(model) == flags(init)
        weights.append(model.state_dict())
    assert not any(inplace for _, inplace in seen[0])  # during the training steps
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_kd_loss_requires_a_teacher():
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(build({"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.25}),
            tiny_data(8), TrainConfig(epochs=1, loss="kd"), torch.device("cpu"), seed=0)


def test_recalibrate_bn_replaces_stale_statistics_with_the_data_mean():
    from edgekd.bn import recalibrate_bn

    data = tiny_data(n=64)
    conv, bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4, momentum=0.1)
    model = torch.nn.Sequential(conv, bn).eval()
    bn.running_mean.fill_(100.0)  # stale, as after channels were removed upstream
    recalibrate_bn(model, data, torch.device("cpu"), images=64, seed=0)
    with torch.no_grad():
        feats = conv(data.normalize(data.train.images))
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    assert bn.momentum == 0.1 and not model.training  # restored


def test_recalibrate_bn_draws_the_images_as_training_drew_them():
    """data.sampling: balanced trains on batches with every class alike, so the statistics are
    re-estimated on such batches too, not on the skewed split as it lies. A 9:1 split whose
    classes are black and white images: one BatchNorm on the pixels sees a mean near -0.8
    (normalised) uniformly, near 0 balanced."""
    from edgekd.bn import recalibrate_bn
    from edgekd.data import Data, Split

    labels = torch.tensor([0] * 900 + [1] * 100)
    split = Split((labels * 255).to(torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2).contiguous(), labels,
                  ["black", "white"], "bw")
    means = {}
    for sampling in ("uniform", "balanced"):
        bn = torch.nn.BatchNorm2d(3)
        recalibrate_bn(torch.nn.Sequential(bn), Data(split, split, None, (0.5,) * 3, (0.5,) * 3, sampling=sampling),
                       torch.device("cpu"), images=500, seed=0)
        means[sampling] = float(bn.running_mean.mean())
    # 500 draws: a share of white images within 4 binomial standard deviations of 0.1 and of 0.5
    assert abs(means["uniform"] - (-0.8)) < 2 * 4 * (0.1 * 0.9 / 500) ** 0.5
    assert abs(means["balanced"]) < 2 * 4 * (0.25 / 500) ** 0.5


def learnable_data(n_train: int = 256, n_test: int = 128, size: int = 32):
    """Four classes told apart by colour under heavy pixel noise: learnable in a few steps."""
    from edgekd.schema import DataConfig
    from edgekd.data import Data, Split

    def split(n, seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(n) % 4
        base = torch.tensor([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]], dtype=torch.float)[labels]
        imgs = (base[:, :, None, None] + 40 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
        return Split(imgs, labels, ["r", "g", "b", "y"], f"colours-{n}-{seed}")

    cfg = DataConfig(source="x")
    return Data(split(n_train, 0), split(n_test, 1), None, cfg.mean, cfg.std, "none", 64, 128)


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "mobilenet_v3_large"])
def test_a_short_mobilenet_v3_run_ends_with_bn_statistics_that_fit_its_weights(arch, caplog):
    """torchvision's MobileNetV3 uses BN momentum 0.01: after a short run its running statistics
    are still near their initial values and the eval-mode model sits at chance. fit() ends by
    re-estimating them, so eval mode scores what the weights learned (batch statistics)."""
    from edgekd.bn import bn_gap
    from edgekd.inference import predict

    data, cpu = learnable_data(), torch.device("cpu")
    figs = {}
    for mode in ("off", "auto"):
        torch.manual_seed(0)
        model = build({"arch": arch, "num_classes": 4, "cifar_stem": True})
        caplog.clear()
        hist = fit(model, data, TrainConfig(epochs=3, loss="ce", lr=0.05, bn_recalibration=mode), cpu, seed=0)
        test_batch_stats = bn_gap(model, type(data)(data.test, data.test, None, data.mean, data.std, "none", 64, 128),
                                  cpu, 128, 0)["batch_stats_top1"]
        figs[mode] = (100.0 * float((predict(model, data, data.test, cpu).argmax(1) == data.test.labels.numpy()).mean()), test_batch_stats, hist[-1], caplog.text, model)
    stale, fixed = figs["off"], figs["auto"]
    assert stale[1] > 40 and stale[0] < stale[1] - 10  # the bug: the weights learned, eval mode did not
    assert "BatchNorm running statistics do not fit" in stale[3] and "bn_recalibration: auto or on" in stale[3]
    # eval mode within a few points of batch statistics (128 test images: 5 points is 6 images, a margin
    # that holds across the float kernels of AVX2, AVX-512 and ARM; the stale gap above is over 10)
    assert abs(fixed[0] - fixed[1]) <= 5, fixed[:2]
    assert fixed[2]["bn_recalibrated_images"] == 256
    assert fixed[2]["train_eval_mode_top1_before_recalibration"] < fixed[2]["train_eval_mode_top1"] - 10
    # the same rule on the training images the loop checks: one set of statistics for all of them
    # against each batch's own is a gap of a few points, and it moves with each CPU's float kernels
    assert abs(fixed[2]["train_eval_mode_top1"] - fixed[2]["train_batch_stats_top1"]) <= 5
    assert "do not fit" not in fixed[3]
    # "auto" re-estimates only statistics that lag by more than BN_GAP_RECALIBRATE and leaves those
    # that fit alone (a long run's averages beat a re-estimate); whether the re-estimated ones above
    # are within it on the check's images is a matter of this CPU's float rounding, the rule is not
    from edgekd.train import BN_CHECK_IMAGES, BN_GAP_RECALIBRATE, _settle_bn

    gap = bn_gap(fixed[4], data, cpu, BN_CHECK_IMAGES, 1)
    lags = gap["batch_stats_top1"] - gap["eval_mode_top1"] > BN_GAP_RECALIBRATE
    rec, before = {}, {k: v.clone() for k, v in fixed[4].state_dict().items() if "running" in k}
    _settle_bn(fixed[4], data, TrainConfig(), cpu, 0, rec, "again")
    assert ("bn_recalibrated_images" in rec) == lags and "train_eval_mode_top1" in rec
    if not lags:
        assert all(torch.equal(v, fixed[4].state_dict()[k]) for k, v in before.items())


def test_running_statistics_that_blow_the_logits_up_are_caught_where_top1_does_not_show_it(caplog, monkeypatch):
    """A barely trained network can score the same top-1 in eval mode and with batch statistics
    while its running statistics blow its activations up (a timm MobileNetV4 at 32 px). The check
    compares the logits' scale too: "auto" re-estimates such statistics, "off" warns, and the
    quantize stage names them when QAT then diverges."""
    from types import SimpleNamespace

    import edgekd.train as train
    from edgekd.bn import LOGIT_SCALE_OFF, bn_gap, logit_scale_ratio, recalibrate_bn
    from edgekd.stages.quantize import _unfit_bn

    data, cpu = learnable_data(), torch.device("cpu")
    torch.manual_seed(0)
    model = _small_net()
    fit(model, data, TrainConfig(epochs=1, loss="ce", lr=0.05, bn_recalibration="off"), cpu, seed=0)
    recalibrate_bn(model, data, cpu, 256, 0)
    ctx = SimpleNamespace(device=cpu, cfg=SimpleNamespace(seed=0))
    assert _unfit_bn(model, data, ctx) == ""  # statistics that fit: a divergence keeps the usual advice
    bn, head = model[4], model[-1]
    with torch.no_grad():  # eval mode now computes about 100x the logits, with the same argmax
        bn.bias.zero_(), head.bias.zero_()
        bn.eps = 1e-12  # (batch statistics need eps > 0)
        bn.running_var.mul_(1e-4)
    gap = bn_gap(model, data, cpu, train.BN_CHECK_IMAGES, 1)
    assert logit_scale_ratio(gap) > 50
    assert logit_scale_ratio({"eval_mode_logit_scale": 0.0, "batch_stats_logit_scale": 0.0}) == 1.0  # a zero head
    assert "not the learning rate" in _unfit_bn(model, data, ctx) and "quantize.method: ptq" in _unfit_bn(model, data, ctx)
    # the top-1 rule stays out of it, so what fires is the scale rule
    monkeypatch.setattr(train, "BN_GAP_RECALIBRATE", 100.0)
    monkeypatch.setattr(train, "BN_GAP_WARN", 100.0)
    rec, before = {}, bn.running_var.clone()
    train._settle_bn(model, data, TrainConfig(bn_recalibration="off"), cpu, 0, rec, "run")
    assert "eval-mode logits average" in caplog.text and "bn_recalibration: auto or on" in caplog.text
    assert "bn_recalibrated_images" not in rec and torch.equal(bn.running_var, before)
    assert rec["train_eval_mode_logit_scale"] > 50 * rec["train_batch_stats_logit_scale"]
    caplog.clear()
    rec = {}
    train._settle_bn(model, data, TrainConfig(), cpu, 0, rec, "run")
    assert rec["bn_recalibrated_images"] == 256
    assert rec["train_eval_mode_logit_scale_before_recalibration"] > 50 * rec["train_batch_stats_logit_scale"]
    after = {k: rec[f"train_{k}"] for k in ("eval_mode_logit_scale", "batch_stats_logit_scale")}
    assert logit_scale_ratio(after) < LOGIT_SCALE_OFF and "do not fit" not in caplog.text


def _small_net(width: int = 8) -> torch.nn.Module:
    """conv-bn-relu blocks and a head: what compiles in seconds on a CPU."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 4))


def test_compile_trains_as_eager_does_and_checkpoints_the_plain_model(tmp_path, monkeypatch):
    """compile: the student's step and a live teacher (feature taps, so it runs in PyTorch) go
    through torch.compile; the loss curve is eager's up to float reordering, the checkpoint holds
    the model's own keys (resume reads it into an uncompiled model) and the run leaves no compiled
    wrapper behind."""
    from edgekd.distill import Objective, TeacherSource

    data = learnable_data(96, 32, size=16)
    torch.manual_seed(1)
    teacher = _small_net(16).eval()
    terms = [{"loss": "kd", "weight": 0.5, "teacher": "t"}, {"loss": "ce", "weight": 0.5},
             {"loss": "fitnet", "student_layer": "3", "teacher_layer": "3", "teacher": "t", "weight": 0.1}]

    def run(mode, state=None):
        cfg = TrainConfig(epochs=2, objective=terms, lr=0.05, eval_every=0, bn_recalibration="off", compile=mode)
        src = TeacherSource(teacher, data, torch.device("cpu"), True, None, None, features=["3"], name="t")
        torch.manual_seed(0)
        model = _small_net()
        hist = fit(model, data, cfg, torch.device("cpu"), seed=0, objective=Objective(cfg.terms(), lambda n, f: src),
                   state_path=state)
        assert src._compiled is None  # dropped with the run
        return hist, model

    eager, _ = run("off")
    real_compile, compiled_calls = torch.compile, []

    def spy(module, **options):  # torch.compile itself, its calls recorded
        compiled_calls.append((module, options))
        return real_compile(module, **options)

    monkeypatch.setattr(torch, "compile", spy)
    state = tmp_path / "state.pt"
    compiled, model = run("default", state)
    assert [(m, o) for m, o in compiled_calls] == [(teacher, {"mode": None, "dynamic": False}),
                                                   (model, {"mode": None, "dynamic": False})]
    for a, b in zip(eager, compiled):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3) and b["fitnet"] == pytest.approx(a["fitnet"], rel=2e-3)
    saved = torch.load(state, weights_only=True)["model"]
    assert saved.keys() == model.state_dict().keys() and not any("_orig_mod" in k for k in saved)
    assert not hasattr(model, "_orig_mod") and type(model) is torch.nn.Sequential


def test_a_compiler_that_fails_is_one_line_naming_the_option(monkeypatch):
    """No C++ compiler, an op inductor cannot lower: the run stops with one line that says how to
    train without compiling, not the compiler's traceback."""
    import edgekd.train as train
    from edgekd.errors import EdgekdError

    def broken_backend(gm, example_inputs):
        raise RuntimeError("cc1plus: not found\ncompilation terminated")

    monkeypatch.setattr(train, "_compile_options", lambda cfg: {"backend": broken_backend, "dynamic": False})
    with pytest.raises(EdgekdError, match=r"^train: torch\.compile \(compile: default\) failed: .*cc1plus: not found.*; "
                                          r"set compile: off to train without it$") as e:
        fit(_small_net(), learnable_data(16, 8, size=8), TrainConfig(epochs=1, loss="ce", eval_every=0, compile="default"),
            torch.device("cpu"), seed=0)
    assert "\n" not in str(e.value)


def test_a_run_whose_logits_no_longer_depend_on_the_image_is_named(caplog):
    """SqueezeNet (no BatchNorm) trained at a MobileNet's learning rate ends with every ReLU dead and
    logits that are the same for every image; the run says so, with what to change. A model that
    still looks at its images, trained the same way, is not named."""
    import logging

    import torch.nn as nn

    data = tiny_data(32)
    cfg = TrainConfig(epochs=1, loss="ce", lr=0.01, eval_every=0)

    def net(dead: bool) -> nn.Module:
        torch.manual_seed(0)
        conv = nn.Conv2d(3, 8, 3, padding=1)
        if dead:  # every unit below zero whatever the image: the ReLU passes nothing, and no gradient
            nn.init.zeros_(conv.weight)
            nn.init.constant_(conv.bias, -1.0)
        return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    for dead in (True, False):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="edgekd"):
            fit(net(dead), data, cfg, torch.device("cpu"), seed=0, desc="distill[ce]")
        said = [r.getMessage() for r in caplog.records if "the same for every image" in r.getMessage()]
        assert bool(said) == dead, said
        if dead:
            assert said[0].startswith("distill[ce]: the logits are the same for every image (top-1 ")
            assert "lower the learning rate (lr 0.01)" in said[0]
