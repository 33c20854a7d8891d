"""Pruning, int8 quantization and export verification on tiny models and tiny data."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgekd.schema import DataConfig
from edgekd.data import Data, Split
from edgekd.errors import ConfigError, EdgekdError
from edgekd.metrics import count_macs, count_params
from edgekd.models import build, rebuild, save_checkpoint
from edgekd.onnx_export import export_onnx, metadata, set_metadata, verify
from edgekd.pruning import make_pruner, pruning_history, resolve_ignored
from edgekd.quant.ptq import quantize_onnx
from edgekd.quant.qat import apply_transform, snap_weights

SPEC = {"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True, "width_mult": 0.5}


def tiny_data(n: int = 64, size: int = 32) -> Data:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 4
    split = Split(imgs, labels, ["a", "b", "c", "d"], "k")
    cfg = DataConfig(source="x")
    return Data(split, split, None, cfg.mean, cfg.std, "none", 32, 64)


def prune_to(model, target: float) -> tuple[float, list]:
    m0 = count_macs(model, 32)
    pruner = make_pruner(model, 32, "l2", 0.95, 50, False, 8, resolve_ignored(model, [], 4))
    while count_macs(model, 32) > m0 * target:
        pruner.step()
    return count_macs(model, 32) / m0, pruning_history(pruner)


@pytest.mark.parametrize("target", [0.5, 0.7])
def test_pruning_reaches_target_macs_and_really_shrinks(target):
    model = build(SPEC)
    p0 = count_params(model)
    kept, history = prune_to(model, target)
    assert target - 0.06 <= kept <= target
    assert count_params(model) < p0
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups == 1]
    assert all(c.out_channels % 8 == 0 or c.out_channels == 4 for c in convs)  # round_to=8
    assert model.classifier[-1].out_features == 4  # classifier kept whole
    assert history


def test_pruned_model_reloads_from_history_in_a_fresh_build(tmp_path):
    model = build(SPEC)
    _, history = prune_to(model, 0.5)
    save_checkpoint(tmp_path / "m.pt", model, SPEC, history, [], {"image_size": 32})
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)  # no pickled code
    again = rebuild(ckpt)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), again.eval()
    assert torch.allclose(model(x), again(x), atol=1e-6)
    assert count_params(again) == count_params(model)


def test_prune_ignore_names_unknown_module():
    model = build(SPEC)
    with pytest.raises(EdgekdError, match="prune.ignore: no module named 'features.99'"):
        resolve_ignored(model, ["features.99"], 4)


def test_prune_config_errors_name_the_key(tmp_path):
    from edgekd.config import validate

    base = {"name": "t", "data": {"source": "x"}, "student": {"arch": "mobilenet_v2"}}
    with pytest.raises(ConfigError, match=r"stages\[0\]\.prune\.target_macs: must be in \(0, 1\]"):
        validate({**base, "stages": [{"prune": {"target_macs": 1.5, "finetune": {"loss": "ce"}}}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.prune: set exactly one of target_macs or ratio"):
        validate({**base, "stages": [{"prune": {"target_macs": 0.5, "ratio": 0.3, "finetune": {"loss": "ce"}}}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.prune\.importance"):
        validate({**base, "stages": [{"prune": {"ratio": 0.3, "importance": "magic", "finetune": {"loss": "ce"}}}]})
    with pytest.raises(ConfigError, match=r"stages\[0\]\.quantize\.calibration\.method"):
        validate({**base, "stages": [{"quantize": {"method": "ptq", "calibration": {"method": "median"}}}]})
    with pytest.raises(ConfigError, match="teacher: required key is missing"):
        validate({**base, "stages": [{"quantize": {"method": "qat"}}]})


def _ort_optimized_ops(path, tmp_path) -> dict[str, int]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    counts: dict[str, int] = {}
    for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def test_ptq_produces_int8_graph_that_onnxruntime_runs_with_int8_kernels(tmp_path):
    model = build(SPEC).eval()
    data = tiny_data()
    fp32 = export_onnx(copy.deepcopy(model), tmp_path / "fp32.onnx", 32)
    calib = data.normalize(data.train.images[:32]).numpy()
    q = quantize_onnx(fp32, tmp_path / "int8.onnx", calib)
    ops = {n.op_type for n in onnx.load(str(q)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    run_ops = _ort_optimized_ops(q, tmp_path)
    assert run_ops.get("QLinearConv", 0) >= 10, run_ops  # int8 conv kernels, not fp32 Conv
    assert q.stat().st_size < fp32.stat().st_size / 2.5


def test_a_pool_whose_scales_onnxruntimes_int8_kernel_refuses_takes_its_outputs_grid(tmp_path):
    """A QAT range for the classifier's input far narrower than the calibrated range of the 1x1
    average pool before it: onnxruntime's QLinearGlobalAveragePool refuses such scales when it
    runs ("parameter out of computation range"; a timm MobileNetV4 student at 32 px did this), so
    the pool's input is quantized on its output's grid, as the QAT model computes, and the file runs."""
    from edgekd.bench.runtimes import ort_session
    from edgekd.quant.ptq import refused_pools

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Conv2d(8, 8, 1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    fp32 = export_onnx(model, tmp_path / "fp32.onnx", 8)
    calib = 3 * torch.randn(32, 3, 8, 8).numpy()
    head = next(t.name for t in onnx.load(str(fp32)).graph.initializer if t.name.startswith("3.") and t.name.endswith("weight"))
    ok = quantize_onnx(fp32, tmp_path / "ok.onnx", calib)
    narrow = quantize_onnx(fp32, tmp_path / "narrow.onnx", calib, activation_ranges={head: (0.0, 1e-3)})
    for path in (ok, narrow):
        sess = ort_session(path, 1)
        assert sess.run(None, {sess.get_inputs()[0].name: calib[:2]})[0].shape == (2, 4)
        assert refused_pools(path) == {}
        assert "QLinearGlobalAveragePool" in _ort_optimized_ops(path, tmp_path)  # still the int8 pool
    # the narrow file's pool input is on its output's grid: the same scale on both sides
    g = onnx.load(str(narrow)).graph
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
    pool = next(n for n in g.node if n.op_type == "GlobalAveragePool")
    dq = next(n for n in g.node if n.output[0] == pool.input[0])
    q = next(n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == pool.output[0])
    assert float(consts[dq.input[1]]) == pytest.approx(float(consts[q.input[1]]), rel=1e-6)
    assert float(consts[q.input[1]]) < 1e-5  # the narrow range (1e-3 over 255 steps) kept


def test_ptq_can_keep_the_stem_conv_fp32_and_only_it(tmp_path):
    model = build(SPEC).eval()
    data = tiny_data()
    fp32 = export_onnx(copy.deepcopy(model), tmp_path / "fp32.onnx", 32)
    calib = data.normalize(data.train.images[:32]).numpy()
    all_int8 = _ort_optimized_ops(quantize_onnx(fp32, tmp_path / "a.onnx", calib), tmp_path)
    stem_fp32 = _ort_optimized_ops(quantize_onnx(fp32, tmp_path / "b.onnx", calib, keep_first_conv_fp32=True), tmp_path)
    assert stem_fp32.get("QLinearConv", 0) == all_int8.get("QLinearConv", 0) - 1
    float_convs = sum(v for k, v in stem_fp32.items() if k in ("Conv", "FusedConv"))
    assert float_convs == 1, stem_fp32


@pytest.mark.parametrize("transform", ["qat", "qat_fp32_stem"])
def test_qat_model_trains_and_exports_to_int8_that_agrees_with_fake_quant(tmp_path, transform):
    from edgekd.quant.qat import QConv2d
    from edgekd.train import TrainConfig, fit

    data = tiny_data()
    model = build(SPEC).eval()
    q = apply_transform(apply_transform(copy.deepcopy(model), "fold_bn"), transform)
    stem = next(m for m in q.modules() if isinstance(m, torch.nn.Conv2d))
    assert isinstance(stem, QConv2d) == (transform == "qat")
    hist = fit(q, data, TrainConfig(epochs=1, loss="ce", lr=0.01, eval_every=0), torch.device("cpu"), seed=0)
    assert len(hist) == 1 and np.isfinite(hist[0]["loss"])
    q.eval()
    snapped = export_onnx(snap_weights(copy.deepcopy(q)), tmp_path / "snap.onnx", 32)
    int8 = quantize_onnx(snapped, tmp_path / "qat_int8.onnx", data.normalize(data.train.images[:32]).numpy(),
                         keep_first_conv_fp32=transform == "qat_fp32_stem")
    assert _ort_optimized_ops(int8, tmp_path).get("QLinearConv", 0) >= 10
    res = verify(int8, q, data, n=64, max_abs=None, min_agreement=0.5)
    assert res["top1_agreement"] >= 0.5
    # the QAT checkpoint rebuilds from its transforms
    save_checkpoint(tmp_path / "q.pt", q, SPEC, [], ["fold_bn", transform], {"image_size": 32})
    again = rebuild(torch.load(tmp_path / "q.pt", weights_only=True)).eval()
    x = data.normalize(data.test.images[:4])
    assert torch.allclose(again(x), q(x), atol=1e-5)


def test_qat_observers_run_under_bf16_autocast():
    """fit() trains with autocast (bf16) on a GPU: activation ranges must stay fp32 buffers."""
    m = apply_transform(apply_transform(build({"arch": "mobilenet_v2", "num_classes": 4, "cifar_stem": True,
                                               "width_mult": 0.25}), "fold_bn"), "qat").train()
    x = torch.randn(4, 3, 32, 32)
    m(x)  # initialise the ranges in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    fqs = [b for n, b in m.named_buffers() if n.endswith(".lo")]
    assert fqs and all(b.dtype == torch.float32 for b in fqs)


def test_export_verification_catches_a_broken_export(tmp_path):
    data = tiny_data(16)
    model = build(SPEC).eval()
    path = export_onnx(copy.deepcopy(model), tmp_path / "m.onnx", 32)
    assert verify(path, model, data, n=16)["max_abs_diff"] < 1e-3
    m = onnx.load(str(path))  # break it: perturb the classifier weights
    init = next(i for i in m.graph.initializer if i.dims == [4, 640] or (len(i.dims) == 2 and i.dims[0] == 4))
    arr = onnx.numpy_helper.to_array(init).copy() * -3.0
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(path))
    with pytest.raises(EdgekdError, match="ONNX output differs from PyTorch"):
        verify(path, model, data, n=16)


class _FixedLogits(torch.nn.Module):
    """Logits = a fixed class pattern plus a small input-dependent part."""

    def __init__(self, pattern, wiggle: float):
        super().__init__()
        self.pattern, self.wiggle = torch.tensor(pattern), wiggle

    def forward(self, x):
        return self.pattern + self.wiggle * x.mean((1, 2, 3))[:, None] * torch.arange(len(self.pattern))


def test_verify_tolerates_int8_noise_on_near_ties_but_catches_a_broken_file():
    """A barely trained model's logits are near-ties: rounding flips its top-1 on many images,
    which is no export bug; a negated classifier on the same model must still fail."""
    data, rng = tiny_data(64), np.random.default_rng(0)
    near_tie = _FixedLogits([2.0, 2.0, 0.0, -1.0], wiggle=1e-3)
    ref = lambda x: near_tie(torch.from_numpy(x)).numpy()  # noqa: E731
    noisy = lambda x: ref(x) + rng.uniform(-0.05, 0.05, (len(x), 4)).astype(np.float32)  # noqa: E731
    res = verify(Path("m.onnx"), near_tie, data, n=64, max_abs=None, min_agreement=0.95, run=noisy)
    assert res["top1_agreement"] < 0.95 and res["decisive_images"] == 0 and res["mean_abs_diff_vs_spread"] < 0.1
    with pytest.raises(EdgekdError, match=r"mean \|diff\| is .*x the logits' spread"):
        verify(Path("m.onnx"), near_tie, data, n=64, max_abs=None, run=lambda x: -3 * ref(x))
    # a model that decides clearly: every top-1 flip counts
    clear = _FixedLogits([3.0, 0.0, -1.0, -2.0], wiggle=1e-3)
    flip = lambda x: clear(torch.from_numpy(x)).numpy()[:, ::-1].copy()  # noqa: E731
    with pytest.raises(EdgekdError, match="top-1 agreement 0.00% < 95% on the 64 images"):
        verify(Path("m.onnx"), clear, data, n=64, max_abs=None, min_agreement=0.95, run=flip)


def test_metadata_is_written_for_the_device_runner(tmp_path):
    data = tiny_data(4)
    path = export_onnx(build(SPEC).eval(), tmp_path / "m.onnx", 32)
    set_metadata(path, metadata(data, "student_fp32"))
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["edgekd.classes"] == '["a", "b", "c", "d"]'
    assert props["edgekd.input_size"] == "[3, 32, 32]"


def test_broken_onnx_file_is_a_clear_error(tmp_path):
    from edgekd.bench.runtimes import ort_session

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file at all")
    with pytest.raises(EdgekdError, match="onnxruntime cannot load it"):
        ort_session(bad)
