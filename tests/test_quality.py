"""Corruptions (deterministic, the right strength ordering, the right shapes) and temperature
scaling (recovers a known temperature, never changes top-1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgekd.calibration import calibrate, fit_temperature, reliability
from edgekd.robustness import CORRUPTIONS, cached_robustness, corrupt, evaluate_robustness


def images(n=16, size=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # smooth images with structure (a gradient plus a bright square), so blur and pixelation change something
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = (60 + 120 * xx * yy)[None, None].repeat(n, 3, 1, 1)
    base[:, :, size // 4 : size // 2, size // 4 : size // 2] = 230
    return (base + 3 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_each_corruption_is_deterministic_and_grows_with_severity(name):
    x = images()
    outs = [corrupt(x, name, s, seed=3) for s in range(1, 6)]
    assert all(o.dtype == torch.uint8 and o.shape == x.shape for o in outs)
    assert torch.equal(corrupt(x, name, 2, seed=3), outs[1])  # same seed, same pixels
    dist = [float((o.float() - x.float()).abs().mean()) for o in outs]
    assert dist[0] > 0.1, dist
    if name == "pixelate":  # pixel error is not monotonic in block size; the resolution left is
        columns = [len(torch.unique(o[0, 0], dim=1).T) for o in outs]
        assert columns == sorted(columns, reverse=True) and columns[-1] < columns[0], columns
    else:
        assert dist[4] > dist[0], dist  # severity 5 changes the image more than severity 1


def test_corruptions_scale_with_image_size():
    small, big = images(4, 32), images(4, 128)
    for name in ("gaussian_blur", "motion_blur", "defocus_blur"):
        assert corrupt(big, name, 3).shape == big.shape
    blur32 = float((corrupt(small, "gaussian_blur", 5).float() - small.float()).abs().mean())
    blur128 = float((corrupt(big, "gaussian_blur", 5).float() - big.float()).abs().mean())
    assert blur128 == pytest.approx(blur32, rel=0.6)  # same blur relative to the image, not the pixel


def test_bad_corruption_and_severity_are_clear_errors():
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(images(2), "fog", 1)
    with pytest.raises(ValueError, match="severity 6 outside 1..5"):
        corrupt(images(2), "jpeg", 6)


def test_evaluate_robustness_scores_every_runner_on_the_same_pixels():
    x = images(20)
    labels = np.zeros(20, dtype=int)
    norm = lambda t: t.float() / 255.0  # noqa: E731
    perfect = lambda a: np.stack([np.ones(len(a)), np.zeros(len(a))], 1)  # noqa: E731
    # "class 0 if the image is bright enough": contrast and noise push images across the line
    fragile = lambda a: np.stack([a.mean((1, 2, 3)) - 0.45, np.zeros(len(a))], 1)  # noqa: E731
    res = evaluate_robustness({"perfect": perfect, "fragile": fragile}, x, labels, norm, ["contrast", "jpeg"], [1, 5])
    assert res["perfect"]["clean_top1"] == 100.0 and res["perfect"]["corruption_top1"] == 100.0
    assert set(res["fragile"]["by_corruption"]) == {"contrast", "jpeg"}
    assert set(res["fragile"]["by_severity"]) == {1, 5} and res["fragile"]["images"] == 20
    assert res["fragile"]["by_corruption"]["contrast"][5] <= res["fragile"]["by_corruption"]["contrast"][1]


def test_robustness_figures_of_an_unchanged_file_come_from_the_cache(tmp_path):
    """The teacher's file is the same every run: its corrupted pass is measured once per images,
    corruptions and seed, and a file whose bytes change is measured again."""
    x, labels = images(20), np.zeros(20, dtype=int)
    norm = lambda t: t.float() / 255.0  # noqa: E731
    files = {"teacher": tmp_path / "teacher.onnx", "student": tmp_path / "student.onnx"}
    files["teacher"].write_bytes(b"teacher weights")
    files["student"].write_bytes(b"student weights")
    calls = []

    def run(path, a):  # "class 0 if bright enough", a different line per file
        calls.append(path.name)
        cut = 0.45 if path.name == "teacher.onnx" else 0.5
        return np.stack([a.mean((1, 2, 3)) - cut, np.zeros(len(a))], 1)

    def measure(**kw):
        calls.clear()
        args = dict(corruptions=["contrast", "jpeg"], severities=[1, 5], seed=0, cache=tmp_path / "cache", images_key="k",
                    runtime="a runtime 1.0")
        return cached_robustness(files, run, x, labels, norm, **{**args, **kw})

    first = measure()
    assert set(calls) == {"teacher.onnx", "student.onnx"}
    second = measure()
    assert calls == [] and all(second[v].pop("cached") for v in files) and second == first  # severities still numbers
    files["student"].write_bytes(b"student weights, fine-tuned again")
    third = measure()
    assert set(calls) == {"student.onnx"} and third["teacher"]["cached"] and "cached" not in third["student"]
    measure(severities=[1, 3])  # other corruptions, severities, seed or images: measured
    assert set(calls) == {"teacher.onnx", "student.onnx"}
    assert set(measure(cache=None)) == set(files) and set(calls) == {"teacher.onnx", "student.onnx"}


def _overconfident(n=4000, classes=10, true_t=2.5, seed=0):
    """Labels drawn from softmax(z / true_t): logits z are `true_t` times too confident."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, (n, classes))
    p = np.exp(z / true_t)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(classes, p=row) for row in p])
    return z, y


def test_temperature_scaling_recovers_the_true_temperature_and_keeps_top1():
    z, y = _overconfident()
    assert fit_temperature(z, y) == pytest.approx(2.5, rel=0.1)
    zt, yt = _overconfident(seed=1)
    res = calibrate(z, y, zt, yt, [str(i) for i in range(10)])
    assert res["top1"] == res["top1_after"]
    assert res["ece_after"] < res["ece_before"] / 2 and res["ece_after"] < 0.03
    rel = reliability(zt, yt, res["temperature"])
    assert sum(rel["count"]) == len(yt) and len(rel["accuracy"]) == 15
    assert "note" not in res


def test_a_temperature_fit_that_runs_to_its_bound_is_not_applied():
    """On a few validation images the model gets wrong the likelihood keeps improving towards a
    uniform softmax: that T would flatten a mostly right model on the test split, so it stays 1."""
    zt, yt = _overconfident(seed=1)
    z, y = _overconfident(n=17, seed=2)
    y = (z.argmax(1) + 1) % 10  # every validation answer wrong
    res = calibrate(z, y, zt, yt, [str(i) for i in range(10)])
    assert res["temperature_fit"] == 20.0 and res["temperature"] == 1.0
    assert res["ece_after"] == res["ece_before"] and res["note"].startswith("not applied: the fit ran to its bound")
    few = calibrate(*_overconfident(n=60, seed=3), zt, yt, [str(i) for i in range(10)])
    assert few["temperature"] == few["temperature_fit"] > 1 and few["note"].startswith("fit on 60 validation images only")
    # the report says each reason once, naming every file it holds for
    from edgekd.bench.quality import quality_markdown

    models = {"int8_ptq": {"label": "int8 PTQ", "calibration": res}, "int8_qat": {"label": "int8 QAT", "calibration": res},
              "student_fp32": {"label": "student fp32", "calibration": few}}
    notes = [line for line in quality_markdown(models) if line.startswith("- ")]
    assert notes == [f"- int8 PTQ, int8 QAT: temperature {res['note']}.", f"- student fp32: temperature {few['note']}."]
