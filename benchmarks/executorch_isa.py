"""ExecuTorch/XNNPACK int8 off the build machine: the same .pte programs run natively, on an
AVX2-only x86 CPU (no AVX-512, no VNNI) and on ARM64 phone cores, on the same test images; top-1
of each and how far each run agrees with the native one (issue 13). XNNPACK picks its kernels by
CPUID (or HWCAP) at run time, so each run executes that CPU's int8 kernels whatever this CPU has:

- AVX2-only x86 with CPUID masked where this CPU can fault CPUID (native speed), else under
  qemu-x86_64 -cpu EPYC-Rome (avx2/launch.py);
- ARM64 cores emulated by qemu-aarch64 in an aarch64 Python with torch and ExecuTorch's runtime
  (`bash benchmarks/arm64/setup.sh --executorch` builds DIR/python-et): cortex-a53 (plain NEON, the
  low-end phone core) and cortex-a76 (dot-product int8, most phones since 2019), 1 thread each.

    python benchmarks/executorch_isa.py OUT_DIR [--images N] [--avx2 auto|mask|qemu|off]
                                        [--arm cortex-a53,cortex-a76] [--arm-python PATH] [--arm-images N]
                                        [--arch mobilenet_v2|mobilenet_v3_small|...]

--arch other than mobilenet_v2 (the shared student) takes that architecture untrained, with its
BatchNorm statistics set on training images: other ops and kernels (MobileNetV3's hardswish and
squeeze-excitation in int8), whose top-1 means nothing but whose agreement across CPUs does.

Needs edgekd[mobile], $EDGEKD_SHARED (the shared CIFAR-10 student and data) and the mask's C
compiler or qemu-user. Emulation is slow (about 100x), so --images defaults to the whole test
split with the mask and to 500 images under qemu, and the ARM columns take a stratified sample
of --arm-images (default 2 000) of them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from arm64.launch import CORES, arm_cores, side_by_side
from avx2.launch import WAYS, avx2_prefix

REPO = Path(__file__).resolve().parents[1]


def run_programs(files: list[str], x: np.ndarray) -> dict[str, np.ndarray]:
    from edgekd.pte_export import pte_runner

    return {Path(f).stem: pte_runner(Path(f), 1)(x) for f in files}


def child(out: Path, tag: str, x_name: str, files: list[str]) -> int:
    """On the other CPU: every program's logits on out/x_name, saved as <stem>.<tag>.npy; prints the
    CPU class this process saw, for the table's header."""
    sys.path.insert(0, str(REPO))  # edgekd, also in the aarch64 Python that has no install of it
    from edgekd.bench.machine import int8_class, machine_info

    for name, logits in run_programs(files, np.load(out / x_name)).items():
        np.save(out / f"{name}.{tag}.npy", logits)
    m = machine_info()
    print(int8_class(m["isa"], m["arch"]))
    return 0


def run_child(cmd: list[str], out: Path, tag: str, x_name: str, files: list[Path], env: dict | None = None) -> str:
    """`child` behind `cmd` (an interpreter, with a CPUID mask or emulator in front); returns its CPU class."""
    proc = subprocess.run([*cmd, __file__, str(out), "--child", tag, x_name, *map(str, files)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{tag}: {proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def cell(a: np.ndarray, b: np.ndarray, y: np.ndarray) -> str:
    """top-1 % of `b` / top-1 agreement % with `a` / max |logit difference| from `a`."""
    return f"{100 * (b.argmax(1) == y).mean():.2f} / {100 * (a.argmax(1) == b.argmax(1)).mean():.2f} / {np.abs(a - b).max():.3g}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--images", type=int, help="test images (default: all with the mask, 500 under qemu)")
    ap.add_argument("--avx2", default="auto", choices=WAYS, help="how to run the AVX2-only CPU")
    ap.add_argument("--arm", default=CORES, help="emulated ARM64 cores, comma-separated ('' = none)")
    ap.add_argument("--arm-python", default=os.environ.get("EDGEKD_ARM64_ET_PYTHON", "/opt/arm64/python-et"),
                    help="the aarch64 Python with ExecuTorch (benchmarks/arm64/setup.sh --executorch)")
    ap.add_argument("--arm-images", type=int, default=2000, help="stratified test images for the ARM columns")
    ap.add_argument("--arch", default="mobilenet_v2", help="mobilenet_v2: the shared student; others: untrained")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # on the other CPU: TAG X_FILE PROGRAMS...
    args = ap.parse_args()
    out = Path(args.out)
    if args.child is not None:
        tag, x_name, *files = args.child
        return child(out, tag, x_name, files)
    avx2 = avx2_prefix(args.avx2)
    cores = arm_cores(args.arm, args.arm_python, "bash benchmarks/arm64/setup.sh --executorch")
    if avx2 is None and not cores:
        print("no other CPU to run on: no AVX2-only x86 (CPUID faulting and a C compiler, or qemu-x86_64) and no ARM "
              "columns", file=sys.stderr)
        return 2
    images = args.images or (10000 if avx2 is None or avx2[0] == "mask" else 500)
    import torch

    from edgekd.bench.machine import int8_class, machine_info
    from edgekd.data import SAMPLE_SEED, load_data, stratified_indices
    from edgekd.models import load_model
    from edgekd.pte_export import export_pte
    from edgekd.schema import DataConfig, ModelConfig

    shared = Path(os.environ.get("EDGEKD_SHARED", "../shared"))
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(DataConfig(source=str(shared / "data/cifar10-jpg.tar.gz"), test_subset=images if images < 10000 else None,
                                            subset=2000), 0)
    shared_student = args.arch == "mobilenet_v2"
    model, _ = load_model(ModelConfig(arch=args.arch, cifar_stem=True, checkpoint=str(shared / "models/mobilenet_v2_cifar10.pt")
                                      if shared_student else None), 10, "student")
    if not shared_student:  # untrained: BatchNorm statistics from training images, so activations have real ranges
        from edgekd.bn import recalibrate_bn

        recalibrate_bn(model, data, torch.device("cpu"), 512, 0)
    model.eval()
    x = data.normalize(data.test.images[:]).numpy()
    y = data.test.labels.numpy()
    np.save(out / "x.npy", x)
    arm = stratified_indices(y, min(args.arm_images, len(y)), SAMPLE_SEED)  # every class: the split is stored by class
    np.save(out / "x_arm.npy", x[arm])
    calib = data.normalize(data.train.sample(256).images[:]).numpy()
    files = [export_pte(model, out / "fp32.pte", 32), export_pte(model, out / "int8.pte", 32, calib),
             export_pte(model, out / "int8_stem_fp32.pte", 32, calib, keep_fp32=["features.0"])]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    native = run_programs([str(f) for f in files], x)
    me = machine_info()
    header = [f"native: {int8_class(me['isa'], me['arch'])}, {len(y)} images"]
    columns = []  # (tag, image indices into x)
    if avx2 is not None:
        _, prefix, how = avx2
        cpu = run_child([*prefix, str(Path(sys.executable).resolve())], out, "avx2", "x.npy", files)
        header.append(f"{cpu}, {how}, {len(y)} images")
        columns.append(("avx2", np.arange(len(y))))
    if cores:
        print(f"running the programs on emulated ARM64 {', '.join(cores)} (qemu; minutes per program) ...", flush=True)
        seen = side_by_side(cores, lambda env: run_child([args.arm_python], out, f"arm-{env['QEMU_CPU']}", "x_arm.npy",
                                                         files, env))
        header.append(f"native top-1 on the ARM sample ({len(arm)} stratified images)")
        columns.append(("native", arm))
        for core, cpu in zip(cores, seen):
            header.append(f"{cpu}, {core} (qemu), the same {len(arm)} images")
            columns.append((f"arm-{core}", arm))
    print(f"{'shared MobileNetV2' if shared_student else args.arch + ' (untrained: top-1 means nothing)'}, PyTorch top-1 {100 * (ref.argmax(1) == y).mean():.2f} on {len(y)} CIFAR-10 test images; "
          "cells: top-1 % / top-1 agreement % with the native run / max |logit difference| from it")
    print("| program | " + " | ".join(header) + " |")
    print("|---" * (len(header) + 1) + "|")
    for f in files:
        a = native[f.stem]
        cells = [f"{100 * (a.argmax(1) == y).mean():.2f}"]
        for tag, idx in columns:
            cells.append(f"{100 * (a[idx].argmax(1) == y[idx]).mean():.2f}" if tag == "native"
                         else cell(a[idx], np.load(out / f"{f.stem}.{tag}.npy"), y[idx]))
        print(f"| {f.name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
