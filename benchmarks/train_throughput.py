"""Training images/s of edgekd's loop vs a plain torchvision reference on the same images and model.

edgekd: the split decoded once into uint8 (cached, as `edgekd run` does), augmentation on whole
uint8 batches (padded crop + flip below 64 px, random-resized crop + flip from 64 px), the shared
training loop (`edgekd.train.fit`), the teacher live (no logit cache: crops make every batch new).
Reference: `torchvision.datasets.ImageFolder` + `DataLoader(num_workers=cores)` + transforms v2
(RandomCrop(pad 4) or RandomResizedCrop, RandomHorizontalFlip, ToDtype, Normalize), JPEGs decoded
every epoch, a plain CE or KD loop with the same model, batch, optimizer and live teacher.

Both run one epoch over the same `--images` training images, alternated `--repeats` times; the
best of each is printed (images/s of the epoch, edgekd's excluding its one-time decode, which is
printed apart). Random weights: speed only.

    python benchmarks/train_throughput.py --data ../shared/data/imagenette2-224 --size 224 --images 256
    python benchmarks/train_throughput.py --data ../shared/data/cifar10-jpg.tar.gz --size 32 --images 2048
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def reference_epoch(student, teacher, folder: Path, idx: list[int], size: int, batch: int, mean, std,
                    loss: str, device: torch.device) -> float:
    import torchvision
    from torchvision.transforms import v2

    crop = v2.RandomResizedCrop(size, antialias=True) if size >= 64 else v2.RandomCrop(size, padding=4)
    tf = v2.Compose([v2.ToImage(), v2.Resize((size, size), antialias=True) if size < 64 else v2.Identity(), crop,
                     v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    ds = torch.utils.data.Subset(torchvision.datasets.ImageFolder(str(folder), transform=tf), idx)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=os.cpu_count() or 1,
                                     pin_memory=device.type == "cuda", drop_last=False)
    from edgekd.inference import layout_pays

    fmt = torch.channels_last if layout_pays(device) else torch.contiguous_format
    student, teacher = student.to(memory_format=fmt), copy.deepcopy(teacher).to(memory_format=fmt)  # edgekd's stays as is
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    student.train()
    amp = device.type == "cuda"  # bf16 autocast on a GPU, as edgekd's loop
    n, t0 = 0, time.perf_counter()
    for x, y in dl:
        x, y = x.to(device, non_blocking=True).contiguous(memory_format=fmt), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = student(x).float()
            if loss == "kd":
                with torch.inference_mode():
                    t = teacher(x).float()
        ce = F.cross_entropy(out, y)
        if loss == "kd":
            t = t.clone()
            kd = F.kl_div(F.log_softmax(out / 4, 1), F.log_softmax(t / 4, 1), reduction="batchmean", log_target=True) * 16
            ce = 0.9 * kd + 0.1 * ce
        opt.zero_grad(set_to_none=True)
        ce.backward()
        opt.step()
        n += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="ImageFolder directory (with train/) or archive")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--student", default="mobilenet_v2")
    ap.add_argument("--teacher", default="resnet50")
    ap.add_argument("--loss", choices=["ce", "kd", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layouts", choices=["auto", "both"], default="auto",
                    help="auto: the memory layout edgekd picks for the device; both: each run in NCHW and in channels_last")
    ap.add_argument("--compile", default="off",
                    help="comma-separated `compile` modes of edgekd's loop to time, e.g. off,default,reduce-overhead; "
                         "a compiled row runs two epochs and reports the second (the first pays the compile, printed)")
    ap.add_argument("--no-reference", dest="reference", action="store_false", help="time edgekd's loop alone")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from edgekd.archive import extract_archive
    from edgekd.data import _find_split_dir, cache_root, load_data
    from edgekd.distill import Objective
    from edgekd.distill.teachers import TeacherSource
    from edgekd.models import build
    from edgekd.schema import ArchiveLimits, DataConfig
    from edgekd.train import TrainConfig, fit

    device = torch.device(args.device)
    src = Path(args.data)
    t0 = time.perf_counter()
    # fit's end-of-run evaluation is not what is measured: one batch of test images keeps it short
    data = load_data(DataConfig(source=str(src), image_size=args.size, subset=args.images, test_subset=args.batch,
                                augment="crop_flip", batch_size=args.batch), seed=0)
    decode_s = time.perf_counter() - t0
    root = src if src.is_dir() else extract_archive(src, cache_root(), ArchiveLimits())
    folder = _find_split_dir(root, None, ("train",))
    idx = _subset_indices(folder, data)
    small = args.size < 64
    spec = lambda arch: {"arch": arch, "num_classes": len(data.classes), "cifar_stem": small, "width_mult": None}
    student0 = build(spec(args.student)).to(device)
    teacher = build(spec(args.teacher)).to(device).eval()
    losses = ["ce", "kd"] if args.loss == "both" else [args.loss]
    print(f"{args.images} images at {args.size} px, batch {args.batch}, {args.student} <- {args.teacher} (live), "
          f"device {device}, torch threads {torch.get_num_threads()}, loader workers {os.cpu_count()}; "
          f"edgekd's one-time decode {decode_s:.1f} s (cached after the first run)")
    import edgekd.inference as inference

    edgekd_pick = inference.layout_pays
    layouts = {"auto": edgekd_pick} if args.layouts == "auto" else {
        "nchw": lambda d: False, "channels_last": lambda d: True}
    results = []
    rows = [(loss, layout, mode) for loss in losses for layout in layouts for mode in args.compile.split(",")]
    for loss, layout, mode in rows:
        pays = layouts[layout]
        inference.layout_pays = pays  # the loop's and the reference's layout for this row
        best = {"edgekd": 0.0, "torchvision reference": 0.0}
        compile_s = []
        for _ in range(args.repeats):
            cfg = TrainConfig(epochs=1 if mode == "off" else 2, loss=loss, lr=0.05, schedule="constant", eval_every=0,
                              cache_teacher=False, bn_recalibration="off", compile=mode)
            objective = None
            if loss == "kd":
                terms = [t.model_copy(update={"teacher": "t"}) if hasattr(t, "teacher") else t for t in cfg.terms()]
                source = TeacherSource(teacher, data, device, False, None, None)
                objective = Objective(terms, lambda name, features: source)
            hist = fit(copy.deepcopy(student0), data, cfg, device, seed=0, objective=objective, desc=f"edgekd {loss}")
            best["edgekd"] = max(best["edgekd"], hist[-1]["images_per_s"])
            if mode != "off":  # the first epoch's extra time: compiling (and CUDA graph capture)
                compile_s.append(hist[0]["seconds"] - hist[-1]["seconds"])
            if args.reference and mode == "off":
                best["torchvision reference"] = max(best["torchvision reference"], reference_epoch(
                    copy.deepcopy(student0), teacher, folder, idx, args.size, args.batch, data.mean, data.std, loss,
                    device))
        inference.layout_pays = edgekd_pick
        e, r = best["edgekd"], best["torchvision reference"] or None
        name = layout if layout != "auto" else ("channels_last" if pays(device) else "nchw")
        versus = f", torchvision reference {r:.1f} img/s, edgekd/reference {e / r:.2f}x" if r else ""
        compiled = f", compile {mode} (compiling took {min(compile_s):.1f} s)" if compile_s else ""
        print(f"{loss} ({name}{compiled}): edgekd {e:.1f} img/s ({len(data.train) / e:.2f} s per epoch){versus}",
              flush=True)
        results.append({"loss": loss, "layout": name, "compile": mode, "edgekd_images_per_s": e,
                        "reference_images_per_s": r, "images": len(data.train), "size": args.size,
                        "batch": args.batch, "device": str(device),
                        **({"compile_s": round(min(compile_s), 1)} if compile_s else {})})
    if args.json:
        args.json.write_text(json.dumps({"decode_s": round(decode_s, 1), "results": results}, indent=1))
    return 0


def _subset_indices(folder: Path, data) -> list[int]:
    """The reference trains on as many images as edgekd's subset, spread over the classes alike."""
    import numpy as np
    import torchvision

    from edgekd.data import stratified_indices

    targets = torchvision.datasets.ImageFolder(str(folder)).targets
    return [int(i) for i in stratified_indices(np.array(targets), len(data.train), 0)]


if __name__ == "__main__":
    raise SystemExit(main())
