"""Benchmark: batched digits views against the same views made per image with torchvision.

Run: python benchmarks/augment_views.py [--batches 20]

Both sides make the two digits views (crop, jitter, blur, solarize, normalise) for 256-image
batches of 16 px images. The per-image side applies torchvision v2 transforms image by image,
as a Dataset transform would; the batched side is DigitsBatchTwoView. The two are timed
interleaved in one process and reported as a ratio, which is steadier than either time.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
from torchvision.transforms import v2

from stabilitylab.data.augment import DigitsBatchTwoView

SIZE = 16
BATCH = 256


def per_image_views(crop_min_scale: float, mean: float, std: float):
    def view(blur_p: float, solarize_p: float):
        return v2.Compose(
            [
                v2.RandomResizedCrop(SIZE, scale=(crop_min_scale, 1.0), antialias=True),
                v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8),
                v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 1.0))], p=blur_p),
                v2.RandomSolarize(threshold=0.5, p=solarize_p),
                v2.Normalize(mean=[mean], std=[std]),
            ]
        )

    first, second = view(1.0, 0.0), view(0.1, 0.2)

    def apply(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.stack([first(image) for image in images]),
            torch.stack([second(image) for image in images]),
        )

    return apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--batches", type=int, default=20, help="batches timed per side (default: %(default)s)"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.rand(BATCH, 1, SIZE, SIZE)
    sides = {
        "per-image torchvision": per_image_views(0.3, 0.5, 0.25),
        "batched": DigitsBatchTwoView(SIZE, 0.3, 0.5, 0.25),
    }
    totals = dict.fromkeys(sides, 0.0)
    for side in sides.values():  # warm-up
        side(images)
    for _ in range(args.batches):
        for name, side in sides.items():
            started = time.perf_counter()
            side(images)
            totals[name] += time.perf_counter() - started

    threads = torch.get_num_threads()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}")
    for name, total in totals.items():
        print(f"{name}: {1000 * total / args.batches:.1f} ms per {BATCH}-image batch")
    ratio = totals["per-image torchvision"] / totals["batched"]
    print(f"batched is {ratio:.1f}x faster")


if __name__ == "__main__":
    main()
