"""JPEG decode levers for DeiT training views, per core ("decode once, render many").

    python -m bench.bench_decode [--n 96] [--rounds 7] [--quick]

Workload: one RandomResizedCrop box per image (scale 0.08-1, log-uniform ratio 3/4-4/3, torchvision's
get_params with 10 tries and the central fallback), rendered to 224x224 with antialiased bilinear
(torchvision.transforms.v2.functional.resized_crop on the uint8 CHW tensor, channels-last in memory), from the
photo JPEGs that bench/bench_replay.py builds (scikit-image's photos, LANCZOS-resized to 500x375 and 1000x750,
Pillow q90, 4:2:0). Every decoder sees the same bytes and the same crop boxes.

Rows, each timed as "decode" (bytes -> uint8 HWC pixels) and "render" (decode + crop + resize to 224):
  current      the pipeline's own decode (pipeline.replay.pixels.decode, called here): header via Image.open;
               when the crop leaves >= 2x the output per side, the DCT scale 1/2, 1/4, 1/8 Pillow's draft picks;
               decoded by simplejpeg (Pillow for other images); its render is checked against the pipeline's
               pixels.crop_resize_image
  pil_full     Image.open(...).convert('RGB'), full size        pil_draft  the same with current's draft
  tv_full      torchvision.io.decode_jpeg, full size (header via Image.open, as the pipeline needs the size)
  sj_full      simplejpeg.decode_jpeg(data, 'RGB')               sj_scaled  + min_height/min_width = Pillow's
                                                                            draft size (the same 1/d as current)
  tj_full      PyTurboJPEG TurboJPEG.decode(data, TJPF_RGB)      tj_scaled  + scaling_factor=(1, d), same d
  tj_crop      crop-then-decode: TurboJPEG.crop_multiple to the MCU-aligned box enclosing the crop (plus one
               chroma-upsampling margin, so the pixels equal tj_scaled's, checked on every crop), then a
               decode of that region at the same 1/d
Every row parses the header its own way inside the timing (the view params need the source size).
Plus: decode-only cost of each libjpeg-turbo DCT scale M/8 (1/8 ... 1, "ladder"), and pre-resized sources
(below). Timing: CPU seconds of this process (time.process_time, 1 torch thread: img/s per core), rows
interleaved block by block and the row order rotated every round; median of the rounds, ratios to `current`
from the same run. Pixel checks: full decodes against Pillow, scaled decodes against Pillow's draft at the same
scale, every render against current's render, crop-decode against the same library's full scaled decode.

Pre-resized sources (FFCV's max-resolution idea, `data.max_side`): the 1000x750 JPEGs decoded and
re-encoded (LANCZOS, q90) with the longer side capped at 256, 320 and 512, rendered with the same relative crop
boxes. Decoding gets cheaper roughly with the pixel count, but the cap throws away detail a large crop would have
kept. A crop whose short side is c pixels of the 1000x750 frame keeps c * cap / 1000 pixels for the 224 output
pixels: at cap 256 (256x192) even the whole image has only 192, so every view is upsampled; at cap 320 (320x240)
only crops with c >= 700 (93% of the short side) are not; at cap 512 (512x384) crops with c < 438 (58%) are
upsampled and none keeps the 2x margin at which an antialiased downscale retains nearly all a 224 view can show.
Every view loses detail in proportion to the cap; the views that really lose are those pushed below 1x
(upsampled), and with RandomResizedCrop's area drawn uniformly in 8-100% that is a large share at any cap under
~2 x 224 / (short-side fraction of a typical crop). A cap is a permanent blur applied once at ingest, whereas the
current rule's DCT scaling never decodes a crop below 1x of the view. The bench reports per cap the fraction of
upsampled views and the mean abs difference / PSNR of the 224 views against the same views rendered from a
full-size decode of the 1000x750 source (and, on the same scale, the current path's own draft-vs-full
difference). For the ~500x375 ImageNet-like sources a cap buys nothing: they are already below any cap that
keeps the majority of views at >= 1x.

Decoders and plans: bench/decode_levers.py; pixel checks: bench/decode_checks.py.
Writes bench/out/bench_decode.json and prints markdown tables.
"""


from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import decode_checks as checks
from bench.bench_replay import SOURCES, photo_jpegs
from bench.common import save_json
from bench.decode_levers import (RATIO, SCALE, SIZE, TJ, TJ_ERROR, Plan, available, cap_jpegs, ladder_fn, make_plans,
                                 rescale_boxes, row_fn, sample_boxes, simplejpeg)

CAPS = (256, 320, 512)
OUT = Path(__file__).resolve().parent / "out" / "bench_decode.json"
FULL_TOL = 2  # max abs difference (levels) allowed between any decoder's full decode and Pillow's
DECODERS = ("current", "pil_full", "pil_draft", "tv_full", "sj_full", "sj_scaled", "tj_full", "tj_scaled", "tj_crop")
LABELS = {
    "current": "current (pipeline.replay.pixels.decode)",
    "pil_full": "Pillow full", "pil_draft": "Pillow draft (current scale)", "tv_full": "torchvision.io full",
    "sj_full": "simplejpeg full", "sj_scaled": "simplejpeg scaled (current scale)",
    "tj_full": "PyTurboJPEG full", "tj_scaled": "PyTurboJPEG scaled (current scale)",
    "tj_crop": "PyTurboJPEG crop + scaled decode",
}
LADDER = [(1, 8), (1, 4), (3, 8), (1, 2), (5, 8), (3, 4), (7, 8), (1, 1)]


def timed(rows: dict, n_of: dict, rounds: int, block: int, warmup: bool = True) -> tuple[dict, dict]:
    """rows: key -> run(lo, hi). Interleaved block by block, row order rotated every round."""
    keys = list(rows)
    for k in keys if warmup else ():  # warm-up: first calls, allocator, caches
        rows[k](0, min(block, n_of[k]))
    cpu = {k: [] for k in keys}
    wall = {k: [] for k in keys}
    n_max = max(n_of.values())
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[:r % len(keys)]
        c_acc = dict.fromkeys(keys, 0.0)
        w_acc = dict.fromkeys(keys, 0.0)
        for lo in range(0, n_max, block):
            for k in order:
                if lo >= n_of[k]:
                    continue
                w, c = time.perf_counter(), time.process_time()
                rows[k](lo, min(lo + block, n_of[k]))
                c_acc[k] += time.process_time() - c
                w_acc[k] += time.perf_counter() - w
        for k in keys:
            cpu[k].append(n_of[k] / max(c_acc[k], 1e-9))
            wall[k].append(n_of[k] / max(w_acc[k], 1e-9))
    return cpu, wall


def _lib_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    from PIL import features

    def v(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    def turbo_in(path):
        try:
            import re

            m = re.search(rb"libjpeg-turbo version ([0-9.]+)", Path(path).read_bytes())
            return m.group(1).decode() if m else None
        except OSError:
            return None

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torchvision": v("torchvision"),
           "pillow": Image.__version__, "pillow_libjpeg_turbo": features.version("libjpeg_turbo"),
           "numpy": np.__version__, "simplejpeg": v("simplejpeg"), "pyturbojpeg": v("PyTurboJPEG"),
           "pyturbojpeg_error": TJ_ERROR, "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    import torchvision

    libs = Path(torchvision.__file__).parent.parent / "torchvision.libs"
    env["torchvision_libjpeg_turbo"] = next((turbo_in(f) for f in sorted(libs.glob("libjpeg*"))), None)
    if simplejpeg is not None:
        so = Path(simplejpeg.__file__).parent.glob("_jpeg*.so")
        env["simplejpeg_libjpeg_turbo"] = next((turbo_in(f) for f in so), None)  # statically linked
    if TJ is not None:
        import ctypes.util

        lib = ctypes.util.find_library("turbojpeg")
        cands = [Path(p) for p in ("/usr/lib/x86_64-linux-gnu/libturbojpeg.so.0", "/usr/local/lib/libturbojpeg.so.0",
                                   "/usr/lib/aarch64-linux-gnu/libturbojpeg.so.0", "/usr/lib64/libturbojpeg.so.0")]
        env["system_libturbojpeg"] = next((turbo_in(p) for p in cands if p.exists()), lib)
    return env


def _args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96, help="images per source size (default 96)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds, median reported (default 7, >= 5)")
    ap.add_argument("--block", type=int, default=16, help="images per interleaving block (default 16)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run for the test (numbers meaningless): 4 images, 1 round, no warm-up, "
                         "4 photos checked")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.block = 4, 1, 4
    return args


class Rows:
    """The timed rows: key -> run(lo, hi), images per row, and what each row is."""

    def __init__(self):
        self.run, self.n_of, self.meta = {}, {}, {}

    def add(self, key: str, run, n: int, **meta) -> None:
        self.run[key], self.n_of[key], self.meta[key] = run, n, meta


def _source_rows(rows: Rows, names, n: int) -> tuple[dict, dict, list[bytes]]:
    """Decode and render rows of every decoder on each photo source; (plans, meta) per source and the photos."""
    plans_by_src, meta, distinct = {}, {}, []
    for src, wh in SOURCES.items():
        jpegs = photo_jpegs(wh, n)
        distinct += list(dict.fromkeys(jpegs))
        plans = plans_by_src[src] = make_plans(jpegs, sample_boxes(n, wh))
        ds = [p.d for p in plans]
        region = (float(np.mean([p.region[2] * p.region[3] / (wh[0] * wh[1]) for p in plans]))
                  if TJ is not None else None)
        meta[src] = {"size": list(wh), "jpeg_kib_mean": float(np.mean([len(b) for b in jpegs]) / 1024),
                     "scale_denominators": {str(d): ds.count(d) for d in (1, 2, 4, 8)},
                     "reduced_fraction": float(np.mean([d > 1 for d in ds])), "crop_region_pixel_fraction": region}
        for stage in ("decode", "render"):
            for name in names:
                rows.add(f"{stage}:{name}@{src}", row_fn(name, stage, plans), n, label=LABELS[name], decoder=name,
                         stage=stage, source=src)
    return plans_by_src, meta, list(dict.fromkeys(distinct))


def _capped_rows(rows: Rows, full: list[Plan], meta: dict, n: int) -> dict[int, list[Plan]]:
    """Render rows on the 1000x750 photos re-encoded with the longer side capped, the same relative crops."""
    capped = {}
    boxes = [p.crop for p in full]
    for cap in CAPS:
        cj = cap_jpegs([p.data for p in full], cap)
        cwh = Image.open(io.BytesIO(cj[0])).size
        plans = capped[cap] = make_plans(cj, rescale_boxes(boxes, SOURCES["1000x750"], cwh))
        meta[f"cap{cap}"] = {"size": list(cwh), "jpeg_kib_mean": float(np.mean([len(b) for b in cj]) / 1024),
                             "reduced_fraction": float(np.mean([p.d > 1 for p in plans]))}
        for name in ("current", "sj_scaled", "tj_crop"):
            if available(name):
                rows.add(f"render:{name}@cap{cap}", row_fn(name, "render", plans), n, label=LABELS[name],
                         decoder=name, stage="render", source=f"cap{cap}")
    return capped


def _ladder_rows(rows: Rows, full: list[Plan], n: int) -> None:
    """Decode-only rows of PyTurboJPEG at each DCT scale M/8."""
    for f in LADDER if TJ is not None else ():
        rows.add(f"ladder:{f[0]}/{f[1]}@1000x750", ladder_fn(f, [p.data for p in full[:n]]), n,
                 label=f"PyTurboJPEG decode at {f[0]}/{f[1]}", decoder="tj", stage="decode", source="1000x750")


def _summarise(rows: Rows, cpu: dict, wall: dict) -> dict:
    """Per row: medians of the rounds, and ratios to `current` on the same source (of the medians, and the median
    of per-round ratios)."""
    med = {k: statistics.median(v) for k, v in cpu.items()}

    def paired(k, ref):
        return statistics.median(a / b for a, b in zip(cpu[k], cpu[ref])) if ref in cpu else None

    out = {}
    for k, m in rows.meta.items():
        stage = k.split(":", 1)[0]
        cur, ref_big = f"{stage}:current@{m['source']}", f"{stage}:current@1000x750"
        out[k] = {**m, "img_per_s_median": med[k], "img_per_s_min": min(cpu[k]), "img_per_s_max": max(cpu[k]),
                  "img_per_s_rounds": cpu[k], "img_per_s_wall_median": statistics.median(wall[k]),
                  "ratio_to_current": med[k] / med[cur] if cur in med else None,
                  "ratio_to_current_paired": paired(k, cur),
                  "ratio_to_current_1000x750": paired(k, ref_big) if m["source"].startswith("cap") else None}
    return out


def _pixel_checks(plans_by_src: dict, distinct: list[bytes], names, quick: bool) -> dict:
    photos = distinct[:2] + distinct[-2:] if quick else distinct
    return {"full_vs_pillow": checks.full_decode_diffs(photos),
            "scaled_vs_pillow_draft": checks.scaled_decode_diffs(photos),
            "views_vs_current": {src: checks.view_diffs(plans_by_src[src], names) for src in SOURCES},
            "crop_decode_vs_full_scaled": {src: checks.crop_decode_check(plans_by_src[src]) for src in SOURCES},
            "other_flavours": checks.flavour_diffs(photos[0] if quick else photos[-1]),
            "full_tolerance_max_abs": FULL_TOL}


def _print_speed(res: dict, names) -> None:
    cfg, rows, quality = res["config"], res["rows"], res["capped_quality"]
    print(f"\n## JPEG decode levers, img/s per core (CPU time, median of {cfg['rounds']} interleaved rounds, "
          f"{cfg['n']} images per source, 1 thread, {SIZE}px views; x = median of per-round ratios to current)\n")
    print("| decoder | " + " | ".join(f"{s} decode | x | {s} +resize | x" for s in SOURCES) + " |")
    print("|---|" + "---:|" * 4 * len(SOURCES))
    for name in names:
        cells = [c for src in SOURCES for stage in ("decode", "render")
                 for r in [rows[f"{stage}:{name}@{src}"]]
                 for c in (f"{r['img_per_s_median']:,.0f}", f"{r['ratio_to_current_paired']:.2f}")]
        print(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    print("\nPre-resized 1000x750 sources, decode + crop + resize (x: vs current on the same source; "
          "x1000: vs current on 1000x750; both medians of per-round ratios):\n")
    print("| source | decoder | img/s | x | x1000 | upsampled views | view MAE vs 1000x750 | PSNR dB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    q, r = quality["1000x750 current (draft)"], rows["render:current@1000x750"]
    print(f"| 1000x750 | current | {r['img_per_s_median']:,.0f} | 1.00 | 1.00 | 0% | {q['mean_abs']:.2f} | "
          f"{q['psnr_db']:.1f} |")
    for cap in CAPS:
        qc, size = quality[f"cap{cap}"], res["sources"][f"cap{cap}"]["size"]
        for name in ("current", "sj_scaled", "tj_crop"):
            r = rows.get(f"render:{name}@cap{cap}")
            if r is not None:
                print(f"| {size[0]}x{size[1]} | {name} | {r['img_per_s_median']:,.0f} | "
                      f"{r['ratio_to_current_paired']:.2f} | {r['ratio_to_current_1000x750']:.2f} | "
                      f"{qc['upsampled_fraction']:.0%} | {qc['mean_abs']:.2f} | {qc['psnr_db']:.1f} |")
    ladder = [(k.split(":")[1].split("@")[0], r["img_per_s_median"]) for k, r in rows.items()
              if k.startswith("ladder:")]
    if ladder:
        print("\nPyTurboJPEG decode-only at each DCT scale, 1000x750: " + ", ".join(f"{s} {v:,.0f}" for s, v in ladder)
              + " img/s")


def _print_pixels(res: dict) -> None:
    pixel = res["pixel_diff"]
    print("\nPixels, full decode vs Pillow: " + ", ".join(
        f"{k} max {v['max_abs']} mean {v['mean_abs']:.4f}" for k, v in pixel["full_vs_pillow"].items()))
    print("Pixels, scaled decode vs Pillow draft: " + ", ".join(
        f"{k} {s} max {v['max_abs']}" for k, per in pixel["scaled_vs_pillow_draft"].items() for s, v in per.items()))
    for fl, per_dec in pixel["other_flavours"].items():
        print(f"{fl}: " + "; ".join(f"{k} " + ", ".join(f"{s}={v}" for s, v in per.items())
                                    for k, per in per_dec.items()))
    for src in SOURCES:
        print(f"Views vs current, {src}: " + ", ".join(
            f"{k} max {v['max_abs']} mean {v['mean_abs']:.3f} same {v['identical_items']}/{v['items']}"
            for k, v in pixel["views_vs_current"][src].items()))
        c = pixel["crop_decode_vs_full_scaled"][src]
        if c:
            print(f"Crop-decode vs full scaled decode, {src}: {c['mismatching_crops']} of {c['crops']} crops differ "
                  f"(max {c['max_abs']}); region smaller than image for {c['region_smaller_than_image']}; "
                  f"scales {res['sources'][src]['scale_denominators']}")
    print(f"bench render vs pipeline.replay.pixels.crop_resize_image: {res['replica_matches_pipeline']}")


def main(argv=None) -> dict:
    args = _args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    names = [k for k in DECODERS if available(k)]
    rows = Rows()
    plans_by_src, meta, distinct = _source_rows(rows, names, args.n)
    capped = _capped_rows(rows, plans_by_src["1000x750"], meta, args.n)
    _ladder_rows(rows, plans_by_src["1000x750"], min(args.n, 32))
    setup_s = time.perf_counter() - t0
    cpu, wall = timed(rows.run, rows.n_of, args.rounds, args.block, warmup=not args.quick)
    timing_s = time.perf_counter() - t0 - setup_s
    k = 4 if args.quick else 16
    res = {
        "config": {"n": args.n, "rounds": args.rounds, "block": args.block, "quick": args.quick, "image_size": SIZE,
                   "crop_scale": list(SCALE), "crop_ratio": list(RATIO), "jpeg_quality": 90, "caps": list(CAPS),
                   "timer": "process_time (CPU s of this process), 1 torch thread"},
        "env": _lib_versions(), "decoders": {name: available(name) for name in DECODERS}, "sources": meta,
        "rows": _summarise(rows, cpu, wall), "pixel_diff": _pixel_checks(plans_by_src, distinct, names, args.quick),
        "capped_quality": checks.capped_quality(plans_by_src["1000x750"], capped),
        "replica_matches_pipeline": checks.pipeline_replica_check(plans_by_src["500x375"][:k]
                                                                  + plans_by_src["1000x750"][:k]),
        "setup_s": setup_s, "timing_s": timing_s}
    _print_speed(res, names)
    _print_pixels(res)
    res["wall_s"] = time.perf_counter() - t0
    save_json(args.out, res)
    print(f"\nwrote {args.out} ({res['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
