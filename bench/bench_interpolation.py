"""Render cost of augment.interpolation: bicubic next to bilinear, per-sample backend, per core.

    python -m bench.bench_interpolation [--n 256] [--reps 5] [--out bench/out/interpolation.json]

500x375 JPEGs (q90, scikit-image's photos) -> 224 px views under the DeiT recipe (block_views: decode, crop
resize, flip, RandAugment, erasing, mixing, targets, digests), one torch thread, CPU time of this process
(time.process_time), so img/s are per core. The two interpolations run interleaved block by block in one
process; the table shows the median over repetitions and the spread. Below it, the two steps that resample,
timed alone on the same inputs: the crop resize (the views' own crop boxes) and one geometric RandAugment op.

Writes the numbers as JSON (--out) next to the printed table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.bench_replay import BLOCK, SIZE, photo_jpegs
from bench.common import machine, save_json
from pipeline.replay import pixels, seeding
from pipeline.replay.view_params import AugmentConfig, sample_params
from pipeline.replay.views import block_views

MODES = ("bilinear", "bicubic")
OUT = Path(__file__).resolve().parent / "out" / "interpolation.json"


def _cpu(fn) -> float:
    t = time.process_time()
    fn()
    return time.process_time() - t


def views_per_second(jpegs: list[bytes], reps: int) -> dict:
    """block_views img/s per core for each interpolation, blocks interleaved between the two."""
    cfgs = {m: AugmentConfig(image_size=SIZE, interpolation=m) for m in MODES}
    blocks = [[(lo + i, d, (lo + i) % 1000) for i, d in enumerate(jpegs[lo:lo + BLOCK])]
              for lo in range(0, len(jpegs), BLOCK)]
    rates = {m: [] for m in MODES}
    for rep in range(reps + 1):  # rep 0 warms up
        spent = dict.fromkeys(MODES, 0.0)
        for block in blocks:
            for m in MODES:
                spent[m] += _cpu(lambda: block_views(block, run_seed=0, seed_index=rep, cfg=cfgs[m],
                                                     num_classes=1000))
        if rep:
            for m in MODES:
                rates[m].append(len(jpegs) / spent[m])
    return rates


def step_costs(jpegs: list[bytes], reps: int) -> dict:
    """ms per view of the crop resize and of one Rotate / ShearX at 224 px, for each interpolation."""
    deit = AugmentConfig(image_size=SIZE)
    images = [pixels.decode(pixels.open_image(d))[0] for d in jpegs]
    params = [sample_params(seeding.view_rng(0, 0, i), tuple(im.shape[1:]), deit) for i, im in enumerate(images)]
    views = [pixels.crop_resize_image(im, p, deit) for im, p in zip(images, params)]
    out = {}
    for m in MODES:
        cfg = AugmentConfig(image_size=SIZE, interpolation=m)
        steps = {"crop resize": lambda: [pixels.crop_resize_image(im, p, cfg) for im, p in zip(images, params)],
                 "Rotate 15": lambda: [pixels.apply_op_image(v, "Rotate", 15.0, m) for v in views],
                 "ShearX 0.15": lambda: [pixels.apply_op_image(v, "ShearX", 0.15, m) for v in views]}
        for name, fn in steps.items():
            fn()  # warm
            out[(name, m)] = statistics.median(_cpu(fn) for _ in range(reps)) * 1000 / len(images)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="images (a multiple of 32)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    jpegs = photo_jpegs((500, 375), args.n)
    rates = views_per_second(jpegs, args.reps)
    steps = step_costs(jpegs[:64], args.reps)
    print(f"\nmachine: {machine()}; torch threads 1; {args.n} 500x375 JPEGs -> {SIZE} px, {args.reps} reps\n")
    print("| interpolation | DeiT views img/s per core (median) | spread | crop resize ms | Rotate ms | ShearX ms |")
    print("|---|---|---|---|---|---|")
    for m in MODES:
        r = rates[m]
        print(f"| {m} | {statistics.median(r):.0f} | {min(r):.0f}-{max(r):.0f} | {steps[('crop resize', m)]:.2f} "
              f"| {steps[('Rotate 15', m)]:.2f} | {steps[('ShearX 0.15', m)]:.2f} |")
    ratio = statistics.median(b / a for a, b in zip(rates["bilinear"], rates["bicubic"]))
    print(f"\nbicubic / bilinear img/s, rep by rep (median): {ratio:.3f}")
    save_json(args.out, {"machine": machine(), "n": args.n, "reps": args.reps, "img_per_s": rates,
                    "bicubic_over_bilinear": ratio,
                    "step_ms": {f"{name} / {m}": v for (name, m), v in steps.items()}})


if __name__ == "__main__":
    main()
