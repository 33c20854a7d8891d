"""LiteRT (.tflite): int8 files with float and with integer interfaces, metadata in the file,
the benchmark's runtime and `edgekd bench` on a .tflite, and the device-side classify.py
reading a .tflite without torch. Skipped (one line) without `pip install 'edgekd[litert]'`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="LiteRT not installed (pip install 'edgekd[litert]')")

import torch  # noqa: E402
from ai_edge_litert import schema_py_generated as fb  # noqa: E402
from ai_edge_litert.interpreter import Interpreter  # noqa: E402

from edgekd.formats import FORMATS  # noqa: E402
from edgekd.formats.base import ConvertJob, ExportJob  # noqa: E402
from edgekd.formats.litert import LiteRTOptions  # noqa: E402
from edgekd.formats import Variant  # noqa: E402
from edgekd.litert_export import tflite_runner  # noqa: E402
from edgekd.onnx_export import metadata  # noqa: E402

from conftest import write_image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """The tiny model as fp32, int8 (float I/O) and int8 (integer I/O) .tflite files."""
    model, data = tiny
    d = tmp_path_factory.mktemp("litert")
    fmt = FORMATS.get("litert")()
    calib = lambda: data.normalize(data.train.images[:32]).numpy()  # noqa: E731
    out = {}
    for name, int8, io in (("fp32", False, False), ("int8", True, False), ("int8_io", True, True)):
        job = ExportJob(data, 48, 0.8, ConvertJob(data.image_size, 17, calib, {"litert": LiteRTOptions(integer_io=io)}))
        v = Variant(name, model, int8=int8, max_abs=1e-3, min_agreement=0.8)
        path = fmt.export(v, d / f"{name}.tflite", job.convert)
        fmt.write_metadata(path, metadata(data, name))
        out[name] = path
    return out


def _ops(path: Path) -> list[tuple[str, list[int]]]:
    """(op name, input tensor types) of the file's main graph, in order."""
    m = fb.Model.GetRootAs(path.read_bytes(), 0)
    names = {v: k for k, v in vars(fb.BuiltinOperator).items() if not k.startswith("_")}
    sg = m.Subgraphs(0)
    out = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        code = m.OperatorCodes(op.OpcodeIndex())
        out.append((names[max(code.BuiltinCode(), code.DeprecatedBuiltinCode())],
                    [sg.Tensors(op.Inputs(j)).Type() for j in range(op.InputsLength()) if op.Inputs(j) >= 0]))
    return out


def test_int8_file_takes_float_by_default_and_int8_with_integer_io(files):
    for name, dtype in (("fp32", np.float32), ("int8", np.float32), ("int8_io", np.int8)):
        it = Interpreter(model_path=str(files[name]))
        assert it.get_input_details()[0]["dtype"] == dtype and it.get_output_details()[0]["dtype"] == dtype, name
    ops = _ops(files["int8"])
    assert ops[0][0] == "QUANTIZE" and ops[-1][0] == "DEQUANTIZE"  # the float interface around the integer program
    convs = [types for name, types in ops if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert convs and all(t[:2] == [fb.TensorType.INT8] * 2 for t in convs)  # int8 kernels: int8 input and weights
    assert _ops(files["int8_io"])[0][0] != "QUANTIZE"


def test_metadata_is_in_the_file_and_names_the_integer_interface(files):
    fmt = FORMATS.get("litert")()
    meta = fmt.read_metadata(files["int8_io"])
    assert json.loads(meta["edgekd.classes"]) == ["a", "b", "c", "d"] and meta["edgekd.layout"] == "NCHW"
    q = json.loads(meta["edgekd.input_quantization"])
    assert q["dtype"] == "int8" and q["scale"] > 0
    assert "edgekd.input_quantization" not in fmt.read_metadata(files["int8"])
    fmt.write_metadata(files["fp32"], {"edgekd.temperature": "2.0"})
    fmt.write_metadata(files["fp32"], {"edgekd.temperature": "1.25"})  # replaced, not duplicated
    m = fb.Model.GetRootAs(files["fp32"].read_bytes(), 0)
    names = [m.Metadata(i).Name().decode() for i in range(m.MetadataLength())]
    assert names.count("edgekd.temperature") == 1 and fmt.read_metadata(files["fp32"])["edgekd.temperature"] == "1.25"


def test_both_int8_interfaces_compute_the_same_logits(tiny, files):
    """(How close int8 is to PyTorch is verify's job: test_formats.)"""
    model, data = tiny
    x = data.normalize(data.test.images).numpy()
    a, b = tflite_runner(files["int8"])(x), tflite_runner(files["int8_io"])(x)
    step = json.loads(FORMATS.get("litert")().read_metadata(files["int8_io"])["edgekd.output_quantization"])["scale"]
    assert np.abs(a - b).max() <= 2 * step + 1e-6
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(tflite_runner(files["fp32"])(x) - ref).max() < 1e-3


def test_edgekd_bench_runs_a_tflite_on_the_litert_runtime(tiny, files, tmp_path):
    _, data = tiny
    folder = tmp_path / "ds"
    for i, img in enumerate(data.test.images[:8].permute(0, 2, 3, 1).numpy()):
        for split in ("train", "test"):
            write_image(folder / split / "abcd"[i % 4] / f"{i}.png", img)
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "edgekd.cli", "bench", str(files["int8"]), str(files["fp32"]), "--runtime", "litert",
                        "--runs", "20", "--warmup", "2", "--data", str(folder), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())["results"]
    assert {Path(x["model"]).name for x in res} == {"int8.tflite", "fp32.tflite"}
    for x in res:
        assert x["runtime"] == "litert" and x["p50_ms"] > 0 and 0 <= x["top1"] <= 100 and x["peak_rss_mb"] > 0


def test_classify_reads_a_tflite_without_torch(files, tmp_path):
    img = tmp_path / "x.png"
    write_image(img, np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    classify = ROOT / "deploy" / "python" / "classify.py"
    code = (
        "import json, runpy, sys\n"
        f"sys.argv = ['classify.py', {str(files['int8_io'])!r}, {str(img)!r}, '--json', '--top-k', '4']\n"
        "try:\n"
        f"    runpy.run_path({str(classify)!r}, run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "sys.stderr.write('MODS=' + json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'edgekd'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stderr.rsplit("MODS=", 1)[1]) == []
    top = json.loads(r.stdout)[0]["top"]
    assert sorted(t["class"] for t in top) == ["a", "b", "c", "d"]
    assert sum(t["prob"] for t in top) == pytest.approx(1.0, abs=1e-5)


def test_classify_and_bench_refuse_a_broken_tflite_in_one_line(tmp_path, capsys):
    from edgekd.cli import main

    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"TFL3 not really a model")
    img = tmp_path / "x.png"
    write_image(img, np.zeros((8, 8, 3), np.uint8))
    r = subprocess.run([sys.executable, str(ROOT / "deploy" / "python" / "classify.py"), str(bad), str(img)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().startswith("classify: error: cannot load model") \
        and len(r.stderr.strip().splitlines()) == 1
    assert main(["bench", str(bad), "--runtime", "litert", "--no-peak-memory"]) == 1
    assert "not a readable .tflite file" in capsys.readouterr().err
