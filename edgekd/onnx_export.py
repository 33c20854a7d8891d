"""ONNX export with the metadata a device-side runner needs, and verification in onnxruntime.

Verification runs the exported file on real test images and compares with PyTorch:
max |logit| difference and top-1 agreement; a mismatch beyond tolerance is an error."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import EdgekdError
from .fileio import atomic_path

log = logging.getLogger("edgekd")


def export_onnx(model: nn.Module, path: Path, image_size: int, opset: int = 17) -> Path:
    """Export with a dynamic batch axis (TorchScript exporter: stable for CNNs, keeps Conv+BN foldable)."""
    model = model.eval().cpu()
    x = torch.zeros(1, 3, image_size, image_size)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, x, str(tmp), opset_version=opset, dynamo=False, input_names=["input"],
                              output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                              do_constant_folding=True)
        except Exception as e:
            raise EdgekdError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return path


def metadata(data, variant: str) -> dict[str, str]:
    return {
        "edgekd.classes": json.dumps(list(data.classes)),
        "edgekd.input_size": json.dumps([3, data.image_size, data.image_size]),
        "edgekd.mean": json.dumps(list(data.mean)),
        "edgekd.std": json.dumps(list(data.std)),
        "edgekd.layout": "NCHW",
        "edgekd.resize": "short_side_centre_crop",
        "edgekd.resize_short": str(data.store_size),
        "edgekd.variant": variant,
    }


def read_metadata(path: Path) -> dict[str, str]:
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise EdgekdError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    return {p.key: p.value for p in m.metadata_props}


def set_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    m = onnx.load(str(path))
    existing = {p.key: p.value for p in m.metadata_props}
    existing.update(props)
    del m.metadata_props[:]
    for k, v in existing.items():
        m.metadata_props.add(key=k, value=v)
    m.producer_name = "edgekd"
    with atomic_path(path) as tmp:
        onnx.save(m, str(tmp))


def run_onnx(path: Path, x: np.ndarray, batch: int = 256, threads: int = 0, int8_kernels: bool = True) -> np.ndarray:
    from .bench.runtimes import ort_session

    sess = ort_session(path, threads, int8_kernels)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def onnx_logits(path: Path, data, split=None) -> np.ndarray:
    """Logits of an ONNX file on a Split (normalised exactly like training)."""
    split = split or data.test
    x = data.normalize(split.images[:]).numpy()
    return run_onnx(path, x)


DECISIVE_MARGIN = 0.25  # a reference top-1 margin below this fraction of its logit spread is a near-tie


def verification_images(data, n: int) -> np.ndarray:
    """The `n` test images (Split.sample) a file is verified on, normalised like training."""
    return data.normalize(data.test.sample(n).images[:]).numpy()


def reference_logits(reference: nn.Module, data, n: int, x: np.ndarray | None = None) -> np.ndarray:
    """What a file is verified against: `reference`'s PyTorch logits on verification_images
    (`x`, where the caller has them already)."""
    x = verification_images(data, n) if x is None else x
    with torch.no_grad():
        return reference.eval().cpu()(torch.from_numpy(x)).numpy()


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """How far `got` is from the reference logits `ref` (see verify): max |diff|, top-1
    agreement overall and on the images `ref` decides clearly, mean |diff| over the logit spread."""
    diff = np.abs(ref - got)
    agree = ref.argmax(1) == got.argmax(1)
    top2 = np.sort(ref, 1)[:, -2:]
    spread = float(np.median(ref.std(1)))
    decisive = (top2[:, 1] - top2[:, 0]) > DECISIVE_MARGIN * spread
    rel = float(diff.mean() / spread) if spread > 0 else 0.0 if diff.mean() == 0 else float("inf")
    k = int(decisive.sum())
    return {"images": int(len(ref)), "max_abs_diff": round(float(diff.max()), 6), "top1_agreement": round(float(agree.mean()), 4),
            "decisive_images": k, "decisive_agreement": round(float(agree[decisive].mean()), 4) if k else None,
            "mean_abs_diff_vs_spread": round(rel, 4)}


def judged_agreement(cmp: dict) -> float | None:
    """compare_logits' top-1 agreement on clearly decided images, where there are enough of them
    to judge by (10, and 5 % of the images), else None."""
    enough = cmp["decisive_images"] >= max(10, 0.05 * cmp["images"])
    return cmp["decisive_agreement"] if enough else None


def verify(path: Path, reference: nn.Module | np.ndarray, data, n: int = 256, max_abs: float | None = 1e-3,
           min_agreement: float = 0.99, run=None, what: str = "ONNX") -> dict:
    """Compare an exported file with its PyTorch reference on `n` real test images; `run` maps a
    batch to logits (default: onnxruntime on `path`).

    Top-1 agreement counts only images the reference decides clearly (top-1 margin above
    DECISIVE_MARGIN of its median per-image logit std): int8 rounding may flip near-ties, and a
    barely trained model is nothing but near-ties. Where the reference decides too few images
    to judge, an int8 file (no `max_abs`) must instead keep its mean |diff| under half the
    logit spread. `reference`: the PyTorch model, or its `reference_logits` where the caller
    verifies several files against it."""
    x = verification_images(data, n)
    ref = reference if isinstance(reference, np.ndarray) else reference_logits(reference, data, n, x)
    out = compare_logits(ref, run(x) if run is not None else run_onnx(path, x))
    k, rel = out["decisive_images"], out["mean_abs_diff_vs_spread"]
    problems = []
    if max_abs is not None and out["max_abs_diff"] > max_abs:
        problems.append(f"max |diff| {out['max_abs_diff']:.3g} > {max_abs:g}")
    if judged_agreement(out) is not None:
        if out["decisive_agreement"] < min_agreement:
            problems.append(f"top-1 agreement {out['decisive_agreement']:.2%} < {min_agreement:.0%} on the {k} images "
                            "the reference decides clearly")
    elif max_abs is None:  # (an fp32 file is held to max_abs anyway)
        log.warning("verify %s: the reference decides only %d of %d images clearly (near-uniform logits); "
                    "checking the logit error instead of top-1", path.name, k, len(x))
        if rel > 0.5:
            problems.append(f"mean |diff| is {rel:.2f}x the logits' spread (> 0.5)")
    if problems:
        raise EdgekdError(f"{path.name}: {what} output differs from PyTorch ({'; '.join(problems)})")
    return out


def verify_int8(path: Path, reference: nn.Module | np.ndarray, data, n: int, min_agreement: float) -> dict:
    """`verify` for an int8 QDQ file, on the arithmetic its target's CPUs compute.

    Where this CPU's int8 kernels compute the target's Q/DQ math exactly (quant.targets), the
    file is verified as onnxruntime runs it here. Where they do not (an 8-bit-weight target on
    an AVX2-only x86, whose kernels saturate), failing would blame the file for this machine:
    it is verified on the reference Q/DQ math instead, and what this CPU's kernels give is
    recorded beside it."""
    from .bench.machine import int8_class, machine_info
    from .quant.targets import resolve_target, saturating_cpu

    m = machine_info()
    target = resolve_target(read_metadata(path).get("edgekd.int8_target", "x86_vnni"))  # files before targets: 8-bit
    here = {"verified_on": int8_class(m["isa"], m["arch"]), "isa": m["isa"], "target": target.name}
    if not isinstance(reference, np.ndarray):
        reference = reference_logits(reference, data, n)
    if target.exact_on(m["isa"], m["arch"]):
        return {**verify(path, reference, data, n, max_abs=None, min_agreement=min_agreement), **here,
                "arithmetic": "this CPU's int8 kernels"}
    out = verify(path, reference, data, n, max_abs=None, min_agreement=min_agreement, what="reference Q/DQ math",
                 run=lambda x: run_onnx(path, x, int8_kernels=False))
    try:
        native = verify(path, reference, data, n, max_abs=None, min_agreement=0.0)
    except EdgekdError as e:  # the logit-error fallback can still fail: record it, it is this CPU's problem
        native = {"error": str(e)}
    why = ("its int16 pair sums saturate 8-bit weights" if saturating_cpu(m["isa"], m["arch"])
           else "its int8 kernels differ from the target's")
    note = (f"target {target.name} runs on {target.runs_on}; this CPU ({here['verified_on']}) is not one of them "
            f"({why}), so {path.name} was verified on the reference Q/DQ math; with this CPU's kernels top-1 agreement "
            f"is {native.get('decisive_agreement', native.get('top1_agreement'))}")
    log.warning("verify %s: %s", path.name, note)
    return {**out, **here, "arithmetic": "reference Q/DQ math (graph optimizations off)", "this_cpu_kernels": native,
            "note": note}


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
