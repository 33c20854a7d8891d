"""deploy/python/classify.py: the torch-free device-side runner.

A tiny classifier is exported here with torch, tagged with the edgekd.* metadata
the exporter writes, and classify.py is run as a subprocess against it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
CLASSIFY = ROOT / "deploy" / "python" / "classify.py"

CLASSES = ["cat", "dog", "ship"]
SIZE = [3, 16, 16]
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]
META = {
    "edgekd.classes": json.dumps(CLASSES),
    "edgekd.input_size": json.dumps(SIZE),
    "edgekd.mean": json.dumps(MEAN),
    "edgekd.std": json.dumps(STD),
    "edgekd.layout": "NCHW",
    "edgekd.resize": "resize",
}


def _export(path: Path, with_meta: bool = True) -> Path:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, len(CLASSES)),
    ).eval()
    raw = path.with_suffix(".raw.onnx")
    torch.onnx.export(
        model, (torch.randn(1, *SIZE),), str(raw),
        dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    m = onnx.load(str(raw))
    if with_meta:
        onnx.helper.set_model_props(m, META)
    onnx.save(m, str(path))
    raw.unlink()
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    model = _export(d / "tiny.onnx")
    bare = _export(d / "bare.onnx", with_meta=False)
    rng = np.random.default_rng(0)
    png = d / "red_square.png"
    # a size different from the model input, so the resize path is exercised
    arr = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
    arr[:, :, 0] = 250
    Image.fromarray(arr).save(png)
    jpg = d / "blueish.jpg"
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).convert("RGB").save(jpg, quality=95)
    gray = d / "gray.png"  # not RGB: classify must convert
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), mode="L").save(gray)
    corrupt = d / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return {"dir": d, "model": model, "bare": bare, "png": png, "jpg": jpg, "gray": gray, "corrupt": corrupt}


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, str(CLASSIFY), *map(str, args)],
                          capture_output=True, text=True, timeout=60, cwd=cwd)


def _reference_top1(model: Path, image: Path) -> str:
    """The same preprocessing, done independently with numpy + onnxruntime."""
    with Image.open(image) as im:
        im = im.convert("RGB").resize((SIZE[2], SIZE[1]), Image.BILINEAR)
        x = np.asarray(im, dtype=np.float32) / 255.0
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    x = x.transpose(2, 0, 1)[None].astype(np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {"input": x})[0][0]
    return CLASSES[int(np.argmax(logits))]


def _parse_text(stdout: str) -> dict[str, list[tuple[float, str]]]:
    out: dict[str, list[tuple[float, str]]] = {}
    current = None
    for line in stdout.splitlines():
        if not line.strip():
            continue
        if line.startswith("  "):
            pct, cls = line.split("%", 1)
            out[current].append((float(pct), cls.strip()))
        else:
            current = line.strip()
            out[current] = []
    return out


def test_text_output(work):
    r = _run(work["model"], work["png"], work["jpg"], "--top-k", "2", "--threads", "1")
    assert r.returncode == 0, r.stderr
    parsed = _parse_text(r.stdout)
    assert list(parsed) == [str(work["png"]), str(work["jpg"])]
    for name, top in parsed.items():
        assert len(top) == 2
        assert top[0][0] >= top[1][0]
        assert all(0.0 <= p <= 100.0 for p, _ in top)
        assert all(c in CLASSES for _, c in top)
    assert parsed[str(work["png"])][0][1] == _reference_top1(work["model"], work["png"])
    assert parsed[str(work["jpg"])][0][1] == _reference_top1(work["model"], work["jpg"])


def test_json_output_all_classes(work):
    r = _run(work["model"], work["png"], work["jpg"], work["gray"], "--json")  # top-k 5 > 3 classes
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [d["image"] for d in data] == [str(work["png"]), str(work["jpg"]), str(work["gray"])]
    for d in data:
        assert len(d["top"]) == len(CLASSES)
        assert sorted(t["class"] for t in d["top"]) == sorted(CLASSES)
        probs = [t["prob"] for t in d["top"]]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert data[0]["top"][0]["class"] == _reference_top1(work["model"], work["png"])
    assert data[2]["top"][0]["class"] == _reference_top1(work["model"], work["gray"])


def _one_error_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("classify: error: ")
    return lines[0]


def test_model_without_metadata(work):
    line = _one_error_line(_run(work["bare"], work["png"]))
    assert "edgekd" in line


def test_missing_model(work):
    line = _one_error_line(_run(work["dir"] / "nope.onnx", work["png"]))
    assert "nope.onnx" in line


def test_corrupt_image(work):
    line = _one_error_line(_run(work["model"], work["png"], work["corrupt"]))
    assert "broken.jpg" in line


def test_missing_image(work):
    line = _one_error_line(_run(work["model"], work["dir"] / "ghost.png"))
    assert "ghost.png" in line


def test_usage_error_exit_2(work):
    r = _run(work["model"], work["png"], "--top-k", "0")
    assert r.returncode == 2
    _one_error_line(r)
    r = _run()  # no arguments at all
    assert r.returncode == 2
    _one_error_line(r)


def _quantize_qdq(src: Path, dst: Path) -> Path:
    """int8 QDQ model, as edgekd's quantize stage produces (metadata_props are kept)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(1)
            self._it = iter([{"input": rng.standard_normal((1, *SIZE), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    m = onnx.load(str(dst))
    if not any(p.key == "edgekd.classes" for p in m.metadata_props):
        onnx.helper.set_model_props(m, META)
        onnx.save(m, str(dst))
    return dst


def test_int8_qdq_model(work):
    q = _quantize_qdq(work["model"], work["dir"] / "tiny_int8.onnx")
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(q)).graph.node)
    r = _run(q, work["png"], work["jpg"], "--json", "--top-k", "3")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert len(data) == 2
    for d in data:
        assert sum(t["prob"] for t in d["top"]) == pytest.approx(1.0, abs=1e-5)


def test_ort_format_model(work, tmp_path):
    """The README's mobile conversion command, and classify.py reading the .ort file."""
    src = tmp_path / "tiny.onnx"
    src.write_bytes(work["model"].read_bytes())
    conv = subprocess.run(
        [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(src),
         "--optimization_style", "Fixed"],
        capture_output=True, text=True, timeout=120)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    ort_file = tmp_path / "tiny.ort"
    assert ort_file.is_file(), sorted(p.name for p in tmp_path.iterdir())
    r = _run(ort_file, work["png"], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["top"][0]["class"] == _reference_top1(work["model"], work["png"])


def test_torch_never_imported(work):
    """Run classify.py's __main__ in a fresh interpreter and check sys.modules after."""
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = ['classify.py', {str(work['model'])!r}, {str(work['png'])!r}, '--json']\n"
        "rc = 0\n"
        "try:\n"
        f"    runpy.run_path({str(CLASSIFY)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)\n"
        "mods = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'edgekd')))\n"
        "sys.stderr.write('MODS=' + json.dumps({'rc': rc, 'mods': mods}) + '\\n')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    marker = [ln for ln in r.stderr.splitlines() if ln.startswith("MODS=")]
    assert marker, r.stderr
    info = json.loads(marker[-1][len("MODS="):])
    assert info["rc"] == 0, r.stderr
    assert info["mods"] == [], f"classify.py imported {info['mods']}"
    assert json.loads(r.stdout)[0]["image"] == str(work["png"])


def test_source_has_no_torch_import():
    src = CLASSIFY.read_text()
    for bad in ("import torch", "from torch", "import edgekd", "from edgekd", "torchvision"):
        assert bad not in src


@pytest.mark.parametrize("temperature", ["2.5", "0.5"])
def test_temperature_from_the_metadata_scales_the_probabilities(work, temperature):
    m = onnx.load(str(work["model"]))
    onnx.helper.set_model_props(m, {**META, "edgekd.temperature": temperature})
    hot = work["dir"] / f"t{temperature}.onnx"
    onnx.save(m, str(hot))
    plain = {t["class"]: t["prob"] for t in json.loads(_run(work["model"], work["png"], "--json").stdout)[0]["top"]}
    scaled = {t["class"]: t["prob"] for t in json.loads(_run(hot, work["png"], "--json").stdout)[0]["top"]}
    # softmax(z / T) = softmax(z)^(1/T), renormalised: same ranking, flatter for T > 1
    powered = {c: p ** (1 / float(temperature)) for c, p in plain.items()}
    total = sum(powered.values())
    for c in CLASSES:
        assert scaled[c] == pytest.approx(powered[c] / total, rel=1e-4)
    assert max(scaled, key=scaled.get) == max(plain, key=plain.get)


def test_bad_temperature_metadata_is_one_line(work):
    m = onnx.load(str(work["model"]))
    onnx.helper.set_model_props(m, {**META, "edgekd.temperature": "-1"})
    bad = work["dir"] / "badt.onnx"
    onnx.save(m, str(bad))
    assert "edgekd.temperature' must be > 0" in _one_error_line(_run(bad, work["png"]))


def test_preprocessing_matches_how_edgekd_evaluated_the_model(tmp_path):
    """classify.py's short_side_centre_crop gives the pixels edgekd's data pipeline evaluated on
    (stored at resize_short, centre crop), for a wide image and a tall one."""
    import importlib.util

    from edgekd.data import load_data
    from edgekd.onnx_export import metadata
    from edgekd.schema import DataConfig

    spec_ = importlib.util.spec_from_file_location("classify", CLASSIFY)
    classify = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(classify)
    rng = np.random.default_rng(3)
    for split in ("train", "test"):
        for cls, shape in (("a", (30, 47, 3)), ("b", (41, 25, 3))):
            (tmp_path / "ds" / split / cls).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / "ds" / split / cls / "x.png")
        (tmp_path / "ds" / split / "c").mkdir()  # a phone photo stored sideways, and its upright twin
        upright = rng.integers(0, 256, (41, 25, 3), dtype=np.uint8)
        sideways = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
        exif = sideways.getexif()
        exif[0x0112] = 6
        sideways.save(tmp_path / "ds" / split / "c" / "x.png", exif=exif)
        Image.fromarray(upright).save(tmp_path / "ds" / split / "c" / "y.png")
        (tmp_path / "ds" / split / "d").mkdir()  # 16-bit grey
        Image.fromarray(rng.integers(0, 65536, (25, 30), dtype=np.uint16)).save(tmp_path / "ds" / split / "d" / "x.png")
    data = load_data(DataConfig(source=str(tmp_path / "ds"), image_size=16, store_size=22, cache_dir=str(tmp_path / "c"),
                                mean=tuple(MEAN), std=tuple(STD)), seed=0)
    meta = metadata(data, "student")
    assert meta["edgekd.resize"] == "short_side_centre_crop" and meta["edgekd.resize_short"] == "22"
    spec = classify.parse_metadata(meta)
    for i, rel in enumerate(("a/x.png", "b/x.png", "c/x.png", "c/y.png", "d/x.png")):
        x = classify.preprocess(str(tmp_path / "ds" / "test" / rel), spec)
        np.testing.assert_allclose(x, data.normalize(data.test.images[i : i + 1])[0].numpy(), atol=1e-5)
    assert torch.equal(data.test.images[2], data.test.images[3])  # both upright, not merely alike
