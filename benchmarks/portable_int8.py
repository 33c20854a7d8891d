"""Do the int8 files compute the same thing on every CPU they ship to? The shared student
quantized with each target (and with the stem conv int8 or fp32), PTQ and a short QAT, plus
LiteRT's own int8 program, each file's top-1 on the test split and its top-1 agreement with
the reference Q/DQ math (what the fake-quant model computes; for a .tflite file, which has no
such switch, its own output on this CPU), run natively and on other CPU classes:

- x86 AVX2 without VNNI: onnxruntime's u8s8 kernels pair products in int16 and can saturate
  (edgekd.quant.targets). Natively with CPUID masked (benchmarks/avx2) where this CPU can fault
  CPUID, on every test image; else under qemu-x86_64 -cpu EPYC-Rome on a sample (avx2/launch.py);
- ARM64 phone cores (qemu-aarch64): cortex-a53 (plain NEON, no dot product) and cortex-a76
  (SDOT/UDOT), onnxruntime's and LiteRT/XNNPACK's ARM kernels in an aarch64 Python.

    python benchmarks/portable_int8.py [--test-images 10000] [--emulated-images 1000] [--qat-images 5000]
                                       [--avx2 auto|mask|qemu|off] [--arm cortex-a53,cortex-a76]
                                       [--arm-python PATH] [--reuse]

Needs ../shared (EDGEKD_SHARED); for the AVX2 column CPUID faulting and a C compiler, or Debian's
qemu-user; for the ARM columns an aarch64 Python with onnxruntime and ai-edge-litert (`bash
benchmarks/arm64/setup.sh` builds one from Debian's and PyPI's arm64 packages; --arm-python or
$EDGEKD_ARM64_PYTHON names it).
Emulation is 100-250x slower than native (TCG), so the emulated columns (qemu) run on
`--emulated-images` test images (a stratified sample, as Split.sample takes), with the
reference's top-1 on the same images beside them.
Name ARM cores (`qemu-aarch64 -cpu help`) rather than `max`: its SME makes onnxruntime take an
SME int8 path whose output under qemu 7.2 differs from every other core's (emulator or kernel: not
known; benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from arm64.launch import CORES, arm_cores, side_by_side
from avx2.launch import WAYS, avx2_prefix

# What runs each file, natively, under qemu-x86_64 and in the aarch64 Python (which has no torch):
# edgekd's torch-free runners, onnxruntime's session with its default graph optimizations (the
# int8 kernels) and LiteRT's Interpreter (XNNPACK), one thread each.
CHILD = """
import sys, json, numpy as np
sys.path.insert(0, {repo!r})
from edgekd.bench.machine import int8_class, machine_info
from edgekd.bench.runtimes import ort_session
from edgekd.litert_export import tflite_runner
x = np.ascontiguousarray(np.load({x!r}))
for p in {files!r}:
    if p.endswith(".onnx"):
        s = ort_session(p, threads=1)
        name = s.get_inputs()[0].name
        z = np.concatenate([s.run(None, {{name: x[i:i + 250]}})[0] for i in range(0, len(x), 250)])
    else:
        z = tflite_runner(p, threads=1)(x)
    np.save(p + ".{tag}.npy", z)
m = machine_info()
print(json.dumps({{"cpu": int8_class(m["isa"], m["arch"])}}))
"""


def run_files(files: list[str], x_path: str, tag: str, prefix: list[str] = (), arm_python: str | None = None,
              env: dict | None = None) -> str:
    """Logits of every file, saved beside it as <file>.<tag>.npy: natively, behind `prefix` (an
    AVX2-only x86: avx2/launch.py) or in the aarch64 Python `arm_python` (with `env` naming the
    emulated core: arm64/launch.py). Returns the int8 class of the CPU the child saw."""
    code = CHILD.format(repo=str(Path(__file__).resolve().parents[1]), x=x_path, files=files, tag=tag)
    python = [arm_python] if arm_python else [*prefix, str(Path(sys.executable).resolve())]
    proc = subprocess.run([*python, "-c", code], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{tag}: " + proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["cpu"]


def make_files(args, model, data, x, out: Path) -> tuple[dict, dict]:
    """The fp32 control, PTQ per target with the stem conv fp32 or int8, a short QAT per target
    (and its fake-quant logits on `x`) and LiteRT's own int8 program: {row name: file}, {row name: logits}."""
    import torch

    from edgekd.onnx_export import export_onnx
    from edgekd.quant.ptq import quantize_onnx
    from edgekd.quant.plan import load_graph, rule_plan
    from edgekd.quant.qat_file import build_qat, qat_int8_file
    from edgekd.quant.targets import TARGETS
    from edgekd.stages.quantize import calibration_images
    from edgekd.train import TrainConfig, fit

    calib = calibration_images(data, 500, 0)
    fp32 = export_onnx(copy.deepcopy(model), out / "fp32.onnx", 32)
    files, fake_quant = {"fp32 (control)": fp32}, {}
    stem_fp32 = rule_plan(load_graph(fp32), True, [])
    for target in ("portable", "x86_vnni"):
        t = TARGETS[target]
        for stem in ("fp32", "int8"):
            files[f"ptq {target} stem-{stem}"] = quantize_onnx(fp32, out / f"ptq_{target}_stem{stem}.onnx", calib,
                                                                target=t, keep_first_conv_fp32=stem == "fp32")
        q = build_qat(model, 32, calib, stem_fp32, {"target": t}).model
        fit(q, data, TrainConfig(epochs=args.qat_epochs, loss="ce", lr=0.0005, schedule="cosine", eval_every=0),
            torch.device("cpu"), seed=0, desc=f"qat[{target}]")
        q.eval()
        with torch.no_grad():
            fake_quant[f"qat {target} stem-fp32"] = np.concatenate([q(torch.from_numpy(x[i : i + 500])).numpy()
                                                                     for i in range(0, len(x), 500)])
        files[f"qat {target} stem-fp32"] = qat_int8_file(q, out / f"qat_{target}_stemfp32.onnx", 32, calib, stem_fp32,
                                                          {"target": t})
    if args.litert:
        from edgekd.formats import FORMATS
        from edgekd.formats.base import ConvertJob, Variant

        tfl = FORMATS.get("litert")()
        job = ConvertJob(32, 17, lambda: calib)
        files["litert int8 (PT2E, every op)"] = tfl.export(Variant("int8", model, int8=True), out / "litert_int8.tflite", job)
    return files, fake_quant


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--test-images", type=int, default=10000)
    ap.add_argument("--emulated-images", type=int, default=1000)
    ap.add_argument("--qat-images", type=int, default=5000)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("runs/portable_int8"))
    ap.add_argument("--avx2", default="auto", choices=WAYS,
                    help="run the files on an AVX2-only x86: CPUID masked (every test image), qemu (a sample), "
                         "auto (the mask where this CPU can fault CPUID) or off")
    ap.add_argument("--arm", default=CORES, help="emulated ARM64 cores, comma-separated ('' = none)")
    ap.add_argument("--arm-python", default=os.environ.get("EDGEKD_ARM64_PYTHON", "/opt/arm64/python"),
                    help="the aarch64 Python (benchmarks/arm64/setup.sh)")
    ap.add_argument("--litert", action=argparse.BooleanOptionalAction, default=True,
                    help="also LiteRT's int8 program of the student (litert-torch PT2E)")
    ap.add_argument("--reuse", action="store_true", help="measure the files an earlier run left in --out again "
                                                         "(e.g. with other --emulated-images or --arm cores)")
    args = ap.parse_args()

    import torch

    from edgekd.data import SAMPLE_SEED, load_data, stratified_indices
    from edgekd.models import load_model
    from edgekd.onnx_export import run_onnx
    from edgekd.schema import DataConfig, ModelConfig

    shared = Path(os.environ.get("EDGEKD_SHARED", "../shared"))
    torch.set_num_threads(2)
    data = load_data(DataConfig(source=str(shared / "data/cifar10-jpg.tar.gz"), subset=args.qat_images,
                                test_subset=args.test_images if args.test_images < 10000 else None,
                                augment="flip", batch_size=128), seed=0)
    model, _ = load_model(ModelConfig(arch="mobilenet_v2", cifar_stem=True,
                                      checkpoint=str(shared / "models/mobilenet_v2_cifar10.pt")), 10, "student")
    model.eval()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    x = data.normalize(data.test.images).numpy()
    y = data.test.labels.numpy()
    np.save(out / "x.npy", x)
    ne = min(args.emulated_images, len(y))
    em = stratified_indices(y, ne, SAMPLE_SEED)  # every class, not the first ones: the split is stored by class
    np.save(out / "x_emulated.npy", x[em])
    manifest = out / "files.json"
    if args.reuse and manifest.exists():
        saved = json.loads(manifest.read_text())
        files = {name: Path(p) for name, p in saved.items()}
        fake_quant = {name: np.load(out / f"{Path(p).name}.fake_quant.npy") for name, p in saved.items()
                      if (out / f"{Path(p).name}.fake_quant.npy").exists()}
    else:
        files, fake_quant = make_files(args, model, data, x, out)
        for name, z in fake_quant.items():
            np.save(out / f"{files[name].name}.fake_quant.npy", z)
        manifest.write_text(json.dumps({name: str(p) for name, p in files.items()}, indent=1))
    paths = [str(p) for p in files.values()]
    native = run_files(paths, str(out / "x.npy"), "native")
    columns = [("native", f"{native}, {len(y)} images")]
    avx2 = avx2_prefix(args.avx2)
    if avx2:
        way, prefix, how = avx2
        masked = way == "mask"
        print(f"running the files on an AVX2-only x86, {how} ...", flush=True)
        cpu = run_files(paths, str(out / ("x.npy" if masked else "x_emulated.npy")), "avx2", prefix)
        columns.append(("avx2", f"{cpu}, {how}, " + (f"{len(y)} images" if masked else f"{ne} stratified")))
    cores = arm_cores(args.arm, args.arm_python, "bash benchmarks/arm64/setup.sh")
    if cores:
        print(f"running the files on emulated ARM64 {', '.join(cores)} (qemu; minutes per file) ...", flush=True)
        seen = side_by_side(cores, lambda env: run_files(paths, str(out / "x_emulated.npy"), f"arm-{env['QEMU_CPU']}",
                                                         arm_python=args.arm_python, env=env))
        columns += [(f"arm-{core}", f"{cpu}, {core} (qemu), {ne} stratified") for core, cpu in zip(cores, seen)]
    fp32_top1 = 100 * float((np.load(f"{files['fp32 (control)']}.native.npy").argmax(1) == y).mean())
    rows = []
    for name, p in files.items():
        here = np.load(f"{p}.native.npy")
        # the reference: Q/DQ as float math (what the fake-quant model computes); a .tflite has no
        # such switch, so its own output on this CPU is what the other CPUs are compared with
        ref = run_onnx(p, x, int8_kernels=False) if p.suffix == ".onnx" else here
        row = {"file": name, "reference": "Q/DQ float math" if p.suffix == ".onnx" else "this CPU",
               "reference_top1": 100 * float((ref.argmax(1) == y).mean()),
               "reference_top1_emulated_images": 100 * float((ref[em].argmax(1) == y[em]).mean())}
        if name in fake_quant:
            row["torch_fake_quant_top1"] = 100 * float((fake_quant[name].argmax(1) == y).mean())
        for tag, _ in columns:
            z = np.load(f"{p}.{tag}.npy")
            k = slice(None) if len(z) == len(y) else em  # the rows this column ran on
            row[f"{tag}_top1"] = 100 * float((z.argmax(1) == y[k]).mean())
            row[f"{tag}_agreement"] = 100 * float((z.argmax(1) == ref[k].argmax(1)).mean())
            row[f"{tag}_max_abs_diff"] = float(np.abs(z - ref[k]).max())
            if tag != "native":  # the same file here and on the emulated CPU
                row[f"{tag}_vs_native_agreement"] = 100 * float((z.argmax(1) == here[k].argmax(1)).mean())
                row[f"{tag}_vs_native_max_abs_diff"] = float(np.abs(z - here[k]).max())
        rows.append(row)
    result = {"fp32_top1": fp32_top1, "test_images": int(len(y)), "emulated_images": ne,
              "columns": dict(columns), "rows": rows}
    (out / "portable_int8.json").write_text(json.dumps(result, indent=2))
    lines = [f"fp32 student (onnxruntime): {fp32_top1:.2f} % on {len(y)} test images; top-1 % / top-1 agreement % with "
             f"the reference (Q/DQ float math; for .tflite its output on {native}) / max |logit diff|", "",
             f"| file | reference, {len(y)} images | QAT fake-quant (torch) | reference, {ne} stratified | "
             + " | ".join(label for _, label in columns) + " |",
             "|---|---|---|---|" + "---|" * len(columns)]
    for r in rows:
        fq = f"{r['torch_fake_quant_top1']:.2f}" if "torch_fake_quant_top1" in r else "–"
        cells = [f"{r[f'{t}_top1']:.2f} / {r[f'{t}_agreement']:.2f} / {r[f'{t}_max_abs_diff']:.3f}" for t, _ in columns]
        lines.append(f"| {r['file']} | {r['reference_top1']:.2f} | {fq} | {r['reference_top1_emulated_images']:.2f} | "
                     + " | ".join(cells) + " |")
    print("\n".join(lines))
    (out / "portable_int8.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
