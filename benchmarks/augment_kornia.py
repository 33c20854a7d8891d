"""Batch augmentation: edgekd's own (edgekd.data.augment_batch) vs kornia.augmentation, same batches.

Why this exists: the brief prefers kornia for batched GPU augmentation, and edgekd does its own
(a padded crop by gather below 64 px; a random-resized crop of every image in one
torchvision.ops.roi_align call from 64 px; a flip by torch.where), on uint8 batches that become
float only there. This times both on the same uint8 batch, from uint8 in to float out (kornia
works on float images, so its conversion is counted), per device:

- 32 px: reflect-padded (4) random crop + horizontal flip, batch 256;
- 224 px from images stored at 256: random-resized crop (scale 0.35-1, ratio 3/4-4/3) + flip,
  batch 256; kornia in both of its cropping modes ("resample": one batched warp; "slice": a crop
  and resize per image).

A/B in one process, interleaved rounds (the order rotates each round), medians after warm-up,
threads pinned and printed with the ISA (CPU) or the GPU's name.

    pip install kornia   # not a dependency of edgekd
    python benchmarks/augment_kornia.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def cases(device: torch.device) -> dict[str, tuple[callable, int]]:
    import kornia.augmentation as K

    from edgekd.data import RESIZED_CROP_RATIO, RESIZED_CROP_SCALE, augment_batch

    gen = torch.Generator().manual_seed(0)
    small = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device=device)
    big = torch.randint(0, 256, (256, 3, 256, 256), dtype=torch.uint8, device=device)
    k_small = K.AugmentationSequential(K.RandomCrop((32, 32), padding=4, padding_mode="reflect"),
                                       K.RandomHorizontalFlip()).to(device)
    k_big = {mode: K.AugmentationSequential(K.RandomResizedCrop((224, 224), scale=RESIZED_CROP_SCALE,
                                                                ratio=RESIZED_CROP_RATIO, cropping_mode=mode),
                                            K.RandomHorizontalFlip()).to(device)
             for mode in ("resample", "slice")}

    def ours(x, mode, size):
        return lambda: augment_batch(x, mode, gen, size=size)

    def kornia(aug, x):
        return lambda: aug(x.float() / 255)

    return {"32 px crop+flip, edgekd": (ours(small, "crop_flip", 32), 256),
            "32 px crop+flip, kornia": (kornia(k_small, small), 256),
            "224 px resized crop+flip, edgekd": (ours(big, "resized_crop_flip", 224), 256),
            "224 px resized crop+flip, kornia resample": (kornia(k_big["resample"], big), 256),
            "224 px resized crop+flip, kornia slice": (kornia(k_big["slice"], big), 256)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from edgekd.bench.machine import machine_info

    todo = cases(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for f, _ in todo.values():  # warm-up
        for _ in range(3):
            f()
    sync()
    times = {k: [] for k in todo}
    names = list(todo)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            todo[k][0]()
            sync()
            times[k].append(time.perf_counter() - t)
    info = machine_info()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{info.get('cpu')}, {info.get('isa')}"
    import kornia

    print(f"# {where}, torch {torch.__version__}, kornia {kornia.__version__}, {args.threads} threads")
    print("| case | ms per batch of 256 (median) | images/s | spread (IQR / median) |")
    print("|---|---|---|---|")
    for k in names:
        q = statistics.quantiles(times[k], n=4)
        med = statistics.median(times[k])
        print(f"| {k} | {1000 * med:.2f} | {todo[k][1] / med:.0f} | {(q[2] - q[0]) / med:.2f} |")


if __name__ == "__main__":
    main()
