"""JPEG decode levers for DeiT training views, per core (issue 13, "decode once, render many").

    python -m bench.bench_decode [--n 96] [--rounds 7] [--quick]

Workload: one RandomResizedCrop box per image (scale 0.08-1, log-uniform ratio 3/4-4/3, torchvision's
get_params with 10 tries and the central fallback), rendered to 224x224 with antialiased bilinear
(torchvision.transforms.v2.functional.resized_crop on the uint8 CHW tensor, channels-last in memory), from the
photo JPEGs that bench/bench_replay.py builds (scikit-image's photos, LANCZOS-resized to 500x375 and 1000x750,
Pillow q90, 4:2:0). Every decoder sees the same bytes and the same crop boxes.

Rows, each timed as "decode" (bytes -> uint8 HWC pixels) and "render" (decode + crop + resize to 224):
  current      the pipeline's `decode` + `_crop_resize` (pipeline/replay.py; pipeline/replay/pixels.py after the
               reorganisation), mirrored here and checked against it: header via Image.open; when the crop
               leaves >= 2x the output per side, Pillow `Image.draft('RGB', ...)` (DCT scale 1/2, 1/4, 1/8),
               else torchvision.io.decode_jpeg at full size
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

Pre-resized sources (FFCV's max-resolution idea, our future `data.max_side`): the 1000x750 JPEGs decoded and
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

Writes bench/out/bench_decode.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from bench.bench_replay import SOURCES, photo_jpegs
from bench.common import save_json

SIZE = 224
CAPS = (256, 320, 512)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
OUT = Path(__file__).resolve().parent / "out" / "bench_decode.json"
FULL_TOL = 2  # max abs difference (levels) allowed between any decoder's full decode and Pillow's
DECODERS = ("current", "pil_full", "pil_draft", "tv_full", "sj_full", "sj_scaled", "tj_full", "tj_scaled", "tj_crop")
LABELS = {
    "current": "current (draft if crop >= 2x, else tv.io)",
    "pil_full": "Pillow full", "pil_draft": "Pillow draft (current scale)", "tv_full": "torchvision.io full",
    "sj_full": "simplejpeg full", "sj_scaled": "simplejpeg scaled (current scale)",
    "tj_full": "PyTurboJPEG full", "tj_scaled": "PyTurboJPEG scaled (current scale)",
    "tj_crop": "PyTurboJPEG crop + scaled decode",
}

with warnings.catch_warnings():  # torchvision 0.29 deprecates torchvision.io in favour of TorchCodec
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg
try:
    import simplejpeg
except ImportError:  # optional: rows are skipped
    simplejpeg = None
try:
    import turbojpeg as _turbojpeg

    _TJ = _turbojpeg.TurboJPEG()
except Exception as e:  # ImportError, or OSError/RuntimeError when the system libturbojpeg is missing/too old
    _turbojpeg, _TJ, _TJ_ERROR = None, None, f"{type(e).__name__}: {e}".splitlines()[0]
else:
    _TJ_ERROR = None


# ------------------------------------------------------------------------------------------------ plans


def rrc_box(rng: np.random.Generator, height: int, width: int) -> list[int]:
    """The pipeline's own RandomResizedCrop draw (pipeline.replay.view_params.sample_crop): [top, left, h, w]."""
    from pipeline.replay.view_params import sample_crop

    return sample_crop(rng, height, width, SCALE, RATIO)


def draft_request(crop, src_wh, out_size: int = SIZE):
    """Current rule: the size passed to Image.draft, or None for a full-size decode."""
    factor = min(crop[2], crop[3]) / out_size
    if factor < 2:
        return None
    w0, h0 = src_wh
    return int(math.ceil(w0 / factor)), int(math.ceil(h0 / factor))


def draft_denom(crop, src_wh, out_size: int = SIZE) -> int:
    """The DCT denominator d (1, 2, 4, 8) that Pillow's draft picks for the current rule (JpegImagePlugin.draft):
    the largest of 8, 4, 2, 1 not above min(W // req_w, H // req_h). Deterministic from the view params."""
    req = draft_request(crop, src_wh, out_size)
    if req is None:
        return 1
    s = min(src_wh[0] // req[0], src_wh[1] // req[1])
    return next(d for d in (8, 4, 2, 1) if s >= d)


def scaled_box(crop, scale: float, hs: int, ws: int) -> tuple[int, int, int, int]:
    """pipeline.replay._crop_resize's box on an image decoded at `scale` (= decoded width / source width)."""
    top, left, h, w = crop
    if scale != 1.0:
        top, left = int(round(top * scale)), int(round(left * scale))
        h = max(1, min(int(round(h * scale)), hs - top))
        w = max(1, min(int(round(w * scale)), ws - left))
    return top, left, h, w


def _mcu_floor(v: int, m: int) -> int:
    return v // m * m


def crop_region(crop, src_wh, d: int, mcu: tuple[int, int]) -> tuple[int, int, int, int]:
    """Source region (x0, y0, w, h) for the crop-decode: origin on the MCU grid, covering the scaled box that
    `scaled_box` takes from a full decode at 1/d, plus one MCU (>= the 1-chroma-sample context that libjpeg-turbo's
    fancy upsampling reads) on every side that is not the image edge, so the decoded pixels of the box equal those
    of a full decode. Region ends that are not the image edge stay on the MCU grid."""
    w0, h0 = src_wh
    ws, hs = -(-w0 // d), -(-h0 // d)
    top, left, h, w = scaled_box(crop, ws / w0, hs, ws)
    mw, mh = mcu
    x0 = max(0, _mcu_floor(left * d, mw) - mw)
    y0 = max(0, _mcu_floor(top * d, mh) - mh)
    x1 = min(w0, _mcu_floor((left + w) * d + mw - 1, mw) + mw)
    y1 = min(h0, _mcu_floor((top + h) * d + mh - 1, mh) + mh)
    return x0, y0, x1 - x0, y1 - y0


class Plan:
    """One image: bytes, source size, crop, current's denominator, and (for tj_crop) the region."""

    def __init__(self, data: bytes, crop: list[int]):
        self.data = data
        im = Image.open(io.BytesIO(data))
        self.wh = im.size
        self.crop = crop
        self.req = draft_request(crop, self.wh)
        self.d = draft_denom(crop, self.wh)
        if self.req is not None:  # our replica of Pillow's choice must be Pillow's choice
            im.draft("RGB", self.req)
            assert im.size == (-(-self.wh[0] // self.d), -(-self.wh[1] // self.d)), (im.size, self.wh, self.d)
        self.region = None
        if _TJ is not None:
            _, _, sub, _ = _TJ.decode_header(data)
            mcu = (_turbojpeg.tjMCUWidth[sub], _turbojpeg.tjMCUHeight[sub])
            self.region = crop_region(crop, self.wh, self.d, mcu)


def make_plans(jpegs: list[bytes], boxes: list[list[int]]) -> list[Plan]:
    return [Plan(b, c) for b, c in zip(jpegs, boxes)]


def sample_boxes(n: int, wh: tuple[int, int], seed: int = 0) -> list[list[int]]:
    return [rrc_box(np.random.default_rng([seed, i]), wh[1], wh[0]) for i in range(n)]


def rescale_boxes(boxes, from_wh, to_wh) -> list[list[int]]:
    """The same relative crop on a resized copy of the source."""
    sx, sy = to_wh[0] / from_wh[0], to_wh[1] / from_wh[1]
    out = []
    for top, left, h, w in boxes:
        t, l_ = int(round(top * sy)), int(round(left * sx))
        h2 = max(1, min(int(round(h * sy)), to_wh[1] - t))
        out.append([t, l_, h2, max(1, min(int(round(w * sx)), to_wh[0] - l_))])
    return out


def cap_jpegs(jpegs: list[bytes], cap: int, quality: int = 90) -> list[bytes]:
    """Re-encode with the longer side capped at `cap` (LANCZOS, q90), as a `data.max_side` ingest would."""
    cache: dict[int, bytes] = {}
    out = []
    for b in jpegs:
        key = id(b)
        if key not in cache:
            im = Image.open(io.BytesIO(b)).convert("RGB")
            s = cap / max(im.size)
            if s < 1:
                im = im.resize((int(round(im.size[0] * s)), int(round(im.size[1] * s))), Image.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality)
            cache[key] = buf.getvalue()
        out.append(cache[key])
    return out


# ------------------------------------------------------------------------------------------------ decoders
# Each returns (uint8 CHW tensor with channels-last strides, scale = decoded width / source width,
# (y, x) offset of the decoded pixels in the decoded-at-scale frame[, (h, w) of that frame when only a region
# of it was decoded]).


def _hwc(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1)


def _hwc_pil(im: Image.Image) -> torch.Tensor:
    with warnings.catch_warnings():  # as the pipeline does: Pillow's array is read-only, nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(im)).permute(2, 0, 1)


def dec_pil_full(p: Plan):
    im = Image.open(io.BytesIO(p.data))
    if im.mode != "RGB":
        im = im.convert("RGB")
    return _hwc_pil(im), 1.0, (0, 0)


def dec_pil_draft(p: Plan):
    im = Image.open(io.BytesIO(p.data))
    scale = 1.0
    if p.req is not None:
        im.draft("RGB", p.req)
        scale = im.size[0] / p.wh[0]
    if im.mode != "RGB":
        im = im.convert("RGB")
    return _hwc_pil(im), scale, (0, 0)


def _tv(data: bytes) -> torch.Tensor:
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def dec_tv_full(p: Plan):
    Image.open(io.BytesIO(p.data))  # the size, as the pipeline reads it before sampling the view
    return _tv(p.data), 1.0, (0, 0)


def dec_current(p: Plan):
    """The pipeline's decode(): draft when the crop allows, else torchvision.io at full size."""
    im = Image.open(io.BytesIO(p.data))
    if p.req is None:
        return _tv(p.data), 1.0, (0, 0)
    im.draft("RGB", p.req)
    scale = im.size[0] / p.wh[0]
    return _hwc_pil(im), scale, (0, 0)


def dec_sj_full(p: Plan):
    simplejpeg.decode_jpeg_header(p.data)
    return _hwc(simplejpeg.decode_jpeg(p.data, "RGB")), 1.0, (0, 0)


def dec_sj_scaled(p: Plan):
    h0, w0, _, _ = simplejpeg.decode_jpeg_header(p.data)
    if p.d == 1:
        return _hwc(simplejpeg.decode_jpeg(p.data, "RGB")), 1.0, (0, 0)
    arr = simplejpeg.decode_jpeg(p.data, "RGB", min_height=-(-h0 // p.d), min_width=-(-w0 // p.d))
    return _hwc(arr), arr.shape[1] / w0, (0, 0)


def dec_tj_full(p: Plan):
    _TJ.decode_header(p.data)
    return _hwc(_TJ.decode(p.data, _turbojpeg.TJPF_RGB)), 1.0, (0, 0)


def dec_tj_scaled(p: Plan):
    w0, _, _, _ = _TJ.decode_header(p.data)
    if p.d == 1:
        return _hwc(_TJ.decode(p.data, _turbojpeg.TJPF_RGB)), 1.0, (0, 0)
    arr = _TJ.decode(p.data, _turbojpeg.TJPF_RGB, scaling_factor=(1, p.d))
    return _hwc(arr), arr.shape[1] / w0, (0, 0)


def dec_tj_crop(p: Plan):
    w0, h0, sub, _ = _TJ.decode_header(p.data)
    d = p.d
    mcu = (_turbojpeg.tjMCUWidth[sub], _turbojpeg.tjMCUHeight[sub])
    x0, y0, w, h = crop_region(p.crop, (w0, h0), d, mcu)  # what the pipeline would compute per view
    sf = None if d == 1 else (1, d)
    data = p.data if (x0, y0, w, h) == (0, 0, w0, h0) else _TJ.crop_multiple(p.data, [(x0, y0, w, h)])[0]
    arr = _TJ.decode(data, _turbojpeg.TJPF_RGB, scaling_factor=sf)
    return _hwc(arr), -(-w0 // d) / w0, (y0 // d, x0 // d), (-(-h0 // d), -(-w0 // d))


DECODE_FNS = {"current": dec_current, "pil_full": dec_pil_full, "pil_draft": dec_pil_draft, "tv_full": dec_tv_full,
              "sj_full": dec_sj_full, "sj_scaled": dec_sj_scaled, "tj_full": dec_tj_full,
              "tj_scaled": dec_tj_scaled, "tj_crop": dec_tj_crop}


def available(name: str) -> bool:
    if name.startswith("sj"):
        return simplejpeg is not None
    if name.startswith("tj"):
        return _TJ is not None
    return True


def render(p: Plan, decoded) -> torch.Tensor:
    """The crop box (rescaled as pipeline.replay._crop_resize does) resized to SIZE, contiguous uint8 CHW."""
    image, scale, (oy, ox), frame = decoded[:4] if len(decoded) == 4 else (*decoded, None)
    hs, ws = frame if frame is not None else image.shape[1:]
    top, left, h, w = scaled_box(p.crop, scale, hs, ws)
    return F.resized_crop(image, top - oy, left - ox, h, w, [SIZE, SIZE], antialias=True).contiguous()


def row_fn(name: str, stage: str, plans: list[Plan]):
    dec = DECODE_FNS[name]
    if stage == "decode":
        def run(lo, hi):
            for p in plans[lo:hi]:
                dec(p)
    else:
        def run(lo, hi):
            for p in plans[lo:hi]:
                render(p, dec(p))
    return run


def ladder_fn(factor, jpegs):
    sf = None if factor == (1, 1) else factor

    def run(lo, hi):
        for b in jpegs[lo:hi]:
            _TJ.decode(b, _turbojpeg.TJPF_RGB, scaling_factor=sf)
    return run


# ------------------------------------------------------------------------------------------------ checks


def _diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> tuple[int, float, float]:
    a = torch.as_tensor(np.asarray(a)).to(torch.int16)
    b = torch.as_tensor(np.asarray(b)).to(torch.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    d = (a - b).abs()
    return int(d.max()), float(d.float().mean()), float((d == 0).float().mean())


def _agg(items: list[tuple[int, float, float]], n_pixels: list[int] | None = None) -> dict:
    if not items:
        return {}
    w = np.asarray(n_pixels if n_pixels else [1] * len(items), dtype=float)
    return {"max_abs": max(i[0] for i in items),
            "mean_abs": float(np.average([i[1] for i in items], weights=w)),
            "identical_pixel_fraction": float(np.average([i[2] for i in items], weights=w)),
            "identical_items": sum(i[0] == 0 for i in items), "items": len(items)}


def _hwc_np(decoded) -> np.ndarray:
    return decoded[0].permute(1, 2, 0).numpy()


def full_decode_diffs(distinct: list[bytes]) -> dict:
    """Full-size decode of each distinct photo, each decoder against Pillow (HWC pixels)."""
    full = {"tv_full": dec_tv_full, "sj_full": dec_sj_full, "tj_full": dec_tj_full}
    out = {}
    for name, fn in full.items():
        if not available(name):
            continue
        items, npx = [], []
        for b in distinct:
            p = Plan(b, [0, 0, 1, 1])
            ref = _hwc_np(dec_pil_full(p))
            items.append(_diff(_hwc_np(fn(p)), ref))
            npx.append(ref.size)
        out[name] = _agg(items, npx)
    return out


def scaled_decode_diffs(distinct: list[bytes]) -> dict:
    """Decode at 1/2, 1/4, 1/8 with each library against Pillow's draft at the same scale (forced: with 224 px
    views the current rule never goes below 1/2 on these sources)."""
    out = {}
    for name in ("sj_scaled", "tj_scaled", "tj_crop"):
        if not available(name):
            continue
        per = {}
        for d in (2, 4, 8):
            items, npx = [], []
            for b in distinct:
                p = Plan(b, [0, 0, 1, 1])
                w0, h0 = p.wh
                p.d, p.req = d, (w0 // d, h0 // d)  # Pillow: min(w0 // (w0 // d), ...) >= d -> exactly 1/d
                p.crop = [0, 0, h0, w0]
                ref = _hwc_np(dec_pil_draft(p))
                assert ref.shape[:2] == (-(-h0 // d), -(-w0 // d)), (ref.shape, d)
                if name == "tj_crop":  # a centred half-size crop: a real sub-region, compared on its box
                    p.crop = [h0 // 4, w0 // 4, h0 // 2, w0 // 2]
                    sub = _TJ.decode_header(b)[2]
                    mcu = (_turbojpeg.tjMCUWidth[sub], _turbojpeg.tjMCUHeight[sub])
                    p.region = crop_region(p.crop, p.wh, d, mcu)
                    img, scale, (oy, ox), _ = dec_tj_crop(p)
                    top, left, h, w = scaled_box(p.crop, scale, ref.shape[0], ref.shape[1])
                    got = img.permute(1, 2, 0).numpy()[top - oy:top - oy + h, left - ox:left - ox + w]
                    ref = ref[top:top + h, left:left + w]
                else:
                    got = _hwc_np(DECODE_FNS[name](p))
                items.append(_diff(got, ref))
                npx.append(ref.size)
            per[f"1/{d}"] = _agg(items, npx)
        out[name] = per
    return out


def format_variants(b: bytes) -> dict[str, bytes]:
    """The same photo as other JPEG flavours: chroma 4:4:4 and 4:2:2, progressive, greyscale."""
    im = Image.open(io.BytesIO(b)).convert("RGB")
    out = {}
    for name, im2, kw in (("4:4:4", im, {"subsampling": 0}), ("4:2:2", im, {"subsampling": 1}),
                          ("progressive 4:2:0", im, {"progressive": True}), ("greyscale", im.convert("L"), {})):
        buf = io.BytesIO()
        im2.save(buf, "JPEG", quality=90, **kw)
        out[name] = buf.getvalue()
    return out


def flavour_diffs(photo: bytes) -> dict:
    """Each decoder against Pillow on other JPEG flavours: full size, 1/2 and 1/4 (as RGB), and tj_crop's box
    against tj_scaled's on 8 random crops per scale."""
    out = {}
    for flavour, b in format_variants(photo).items():
        res = {}
        for d in (1, 2, 4):
            p = Plan(b, [0, 0, 1, 1])
            w0, h0 = p.wh
            p.d, p.req, p.crop = d, ((w0 // d, h0 // d) if d > 1 else None), [0, 0, h0, w0]
            ref_im = Image.open(io.BytesIO(b))
            if p.req:
                ref_im.draft("RGB", p.req)
            ref = np.asarray(ref_im.convert("RGB"))
            for name in ("tv_full", "sj_scaled", "tj_scaled"):
                if not available(name) or (name == "tv_full" and d > 1):
                    continue
                try:
                    res.setdefault(name, {})[f"1/{d}"] = _diff(_hwc_np(DECODE_FNS[name](p)), ref)[:2]
                except Exception as e:  # a decoder that refuses a flavour is a finding, not a crash
                    res.setdefault(name, {})[f"1/{d}"] = f"{type(e).__name__}: {e}"
            if _TJ is not None:
                boxes = sample_boxes(8, (w0, h0), seed=d)
                sub = _TJ.decode_header(b)[2]
                mcu = (_turbojpeg.tjMCUWidth[sub], _turbojpeg.tjMCUHeight[sub])
                bad = 0
                for c in boxes:
                    p.crop, p.region = c, crop_region(c, (w0, h0), d, mcu)
                    img, scale, (oy, ox), _ = dec_tj_crop(p)
                    full = dec_tj_scaled(p)[0]
                    top, left, h, w = scaled_box(c, scale, full.shape[1], full.shape[2])
                    bad += not torch.equal(img[:, top - oy:top - oy + h, left - ox:left - ox + w],
                                           full[:, top:top + h, left:left + w])
                res.setdefault("tj_crop_mismatching_crops", {})[f"1/{d}"] = bad
        out[flavour] = res
    return out


def crop_decode_check(plans: list[Plan]) -> dict:
    """tj_crop's decoded box against the box of tj_scaled's full decode (same library, same scale)."""
    if _TJ is None:
        return {}
    items, partial = [], 0
    for p in plans:
        a_img, scale, (oy, ox), _ = dec_tj_crop(p)
        b_img, _, _ = dec_tj_scaled(p)
        top, left, h, w = scaled_box(p.crop, scale, b_img.shape[1], b_img.shape[2])
        partial += (oy, ox, *a_img.shape[1:]) != (0, 0, *b_img.shape[1:])
        items.append(_diff(a_img[:, top - oy:top - oy + h, left - ox:left - ox + w],
                           b_img[:, top:top + h, left:left + w]))
    agg = _agg(items)
    return {"crops": len(plans), "region_smaller_than_image": partial,
            "mismatching_crops": len(items) - agg["identical_items"], "max_abs": agg["max_abs"]}


def view_diffs(plans: list[Plan], names) -> dict:
    ref = [render(p, dec_current(p)) for p in plans]
    out = {}
    for name in names:
        if name == "current" or not available(name):
            continue
        out[name] = _agg([_diff(render(p, DECODE_FNS[name](p)), r) for p, r in zip(plans, ref)])
    return out


def _find(name: str, modules=("pipeline.replay", "pipeline.replay.pixels", "pipeline.replay.view_params")):
    import importlib

    for m in modules:
        try:
            obj = getattr(importlib.import_module(m), name, None)
        except ImportError:
            continue
        if obj is not None:
            return obj
    raise ImportError(f"{name} not found in {modules}")


def pipeline_replica_check(plans: list[Plan]) -> dict:
    """Our mirror of the current path against the pipeline's own decode + _crop_resize (pipeline/replay.py, or
    pipeline/replay/{pixels,params}.py after the reorganisation); matches=None when neither is importable."""
    try:
        AugmentConfig, _crop_resize, decode, open_image = (_find(n) for n in ("AugmentConfig", "_crop_resize", "decode",
                                                                               "open_image"))
        cfg = AugmentConfig(image_size=SIZE, interpolation="bilinear")  # render() above is bilinear
        same = 0
        for p in plans:
            img, scale = decode(open_image(p.data), {"crop": p.crop}, SIZE)
            same += torch.equal(_crop_resize(img, {"crop": p.crop}, cfg, scale), render(p, dec_current(p)))
        return {"matches": same == len(plans), "checked": len(plans), "module": decode.__module__}
    except Exception as e:  # pipeline/ is being reorganised: the bench must not depend on its layout
        return {"matches": None, "reason": f"{type(e).__name__}: {e}"}


def capped_quality(plans_full: list[Plan], capped: dict[int, list[Plan]]) -> dict:
    """224 views from capped sources (current path) against the same views from the 1000x750 source, decoded
    at full size with Pillow (the most detail the source has)."""
    ref = [render(p, dec_pil_full(p)) for p in plans_full]

    def score(views):
        mae = [float((v.to(torch.int16) - r.to(torch.int16)).abs().float().mean()) for v, r in zip(views, ref)]
        mse = [float(((v.float() - r.float()) ** 2).mean()) for v, r in zip(views, ref)]
        m = float(np.mean(mse))
        return {"mean_abs": float(np.mean(mae)), "psnr_db": 10 * math.log10(255 ** 2 / m) if m > 0 else float("inf")}

    out = {"1000x750 current (draft)": score([render(p, dec_current(p)) for p in plans_full])}
    for cap, plans in capped.items():
        out[f"cap{cap}"] = {**score([render(p, dec_current(p)) for p in plans]),
                            "upsampled_fraction": float(np.mean([min(p.crop[2:]) < SIZE for p in plans])),
                            "reduced_scale_fraction": float(np.mean([p.d > 1 for p in plans]))}
    return out


# ------------------------------------------------------------------------------------------------ timing


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
           "pyturbojpeg_error": _TJ_ERROR, "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    import torchvision

    libs = Path(torchvision.__file__).parent.parent / "torchvision.libs"
    env["torchvision_libjpeg_turbo"] = next((turbo_in(f) for f in sorted(libs.glob("libjpeg*"))), None)
    if simplejpeg is not None:
        so = Path(simplejpeg.__file__).parent.glob("_jpeg*.so")
        env["simplejpeg_libjpeg_turbo"] = next((turbo_in(f) for f in so), None)  # statically linked
    if _TJ is not None:
        import ctypes.util

        lib = ctypes.util.find_library("turbojpeg")
        cands = [Path(p) for p in ("/usr/lib/x86_64-linux-gnu/libturbojpeg.so.0", "/usr/local/lib/libturbojpeg.so.0",
                                   "/usr/lib/aarch64-linux-gnu/libturbojpeg.so.0", "/usr/lib64/libturbojpeg.so.0")]
        env["system_libturbojpeg"] = next((turbo_in(p) for p in cands if p.exists()), lib)
    return env


# ------------------------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96, help="images per source size (default 96)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds, median reported (default 7, >= 5)")
    ap.add_argument("--block", type=int, default=16, help="images per interleaving block (default 16)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run for the test (numbers meaningless): 4 images, 1 round, no warm-up, 4 photos checked")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.block = 4, 1, 4
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    names = [k for k in DECODERS if available(k)]

    rows, n_of, meta = {}, {}, {}
    row_meta: dict[str, dict] = {}
    plans_by_src: dict[str, list[Plan]] = {}
    distinct: list[bytes] = []
    for src, wh in SOURCES.items():
        jpegs = photo_jpegs(wh, args.n)
        distinct += list(dict.fromkeys(jpegs))
        plans = make_plans(jpegs, sample_boxes(args.n, wh))
        plans_by_src[src] = plans
        ds = [p.d for p in plans]
        meta[src] = {"size": list(wh), "jpeg_kib_mean": float(np.mean([len(b) for b in jpegs]) / 1024),
                     "scale_denominators": {str(d): ds.count(d) for d in (1, 2, 4, 8)},
                     "reduced_fraction": float(np.mean([d > 1 for d in ds])),
                     "crop_region_pixel_fraction": (float(np.mean([p.region[2] * p.region[3] / (wh[0] * wh[1])
                                                                   for p in plans])) if _TJ is not None else None)}
        for stage in ("decode", "render"):
            for name in names:
                key = f"{stage}:{name}@{src}"
                rows[key], n_of[key] = row_fn(name, stage, plans), args.n
                row_meta[key] = {"label": LABELS[name], "decoder": name, "stage": stage, "source": src}

    big = SOURCES["1000x750"]
    capped_plans: dict[int, list[Plan]] = {}
    full_boxes = [p.crop for p in plans_by_src["1000x750"]]
    for cap in CAPS:
        cj = cap_jpegs([p.data for p in plans_by_src["1000x750"]], cap)
        cwh = Image.open(io.BytesIO(cj[0])).size
        plans = make_plans(cj, rescale_boxes(full_boxes, big, cwh))
        capped_plans[cap] = plans
        meta[f"cap{cap}"] = {"size": list(cwh), "jpeg_kib_mean": float(np.mean([len(b) for b in cj]) / 1024),
                             "reduced_fraction": float(np.mean([p.d > 1 for p in plans]))}
        for name in ("current", "sj_scaled", "tj_crop"):
            if available(name):
                key = f"render:{name}@cap{cap}"
                rows[key], n_of[key] = row_fn(name, "render", plans), args.n
                row_meta[key] = {"label": LABELS[name], "decoder": name, "stage": "render", "source": f"cap{cap}"}
    n_ladder = min(args.n, 32)
    ladder_factors = [(1, 8), (1, 4), (3, 8), (1, 2), (5, 8), (3, 4), (7, 8), (1, 1)] if _TJ is not None else []
    for f in ladder_factors:
        key = f"ladder:{f[0]}/{f[1]}@1000x750"
        rows[key], n_of[key] = ladder_fn(f, [p.data for p in plans_by_src["1000x750"][:n_ladder]]), n_ladder
        row_meta[key] = {"label": f"PyTurboJPEG decode at {f[0]}/{f[1]}", "decoder": "tj", "stage": "decode",
                         "source": "1000x750"}
    setup_s = time.perf_counter() - t0

    cpu, wall = timed(rows, n_of, args.rounds, args.block, warmup=not args.quick)
    med = {k: statistics.median(v) for k, v in cpu.items()}

    def paired(k, ref):
        return statistics.median(a / b for a, b in zip(cpu[k], cpu[ref])) if ref in cpu else None

    out_rows = {}
    for k, m in row_meta.items():
        stage, rest = k.split(":", 1)
        cur = f"{stage}:current@{m['source']}"
        ref_big = f"{stage}:current@1000x750"
        out_rows[k] = {**m, "img_per_s_median": med[k], "img_per_s_min": min(cpu[k]), "img_per_s_max": max(cpu[k]),
                       "img_per_s_rounds": cpu[k], "img_per_s_wall_median": statistics.median(wall[k]),
                       "ratio_to_current": med[k] / med[cur] if cur in med else None,  # of the medians
                       "ratio_to_current_paired": paired(k, cur),  # median of per-round ratios (same round)
                       "ratio_to_current_1000x750": paired(k, ref_big) if m["source"].startswith("cap") else None}
    timing_s = time.perf_counter() - t0 - setup_s

    distinct = list(dict.fromkeys(distinct))
    if args.quick:
        distinct = distinct[:2] + distinct[-2:]
    pixel = {"full_vs_pillow": full_decode_diffs(distinct),
             "scaled_vs_pillow_draft": scaled_decode_diffs(distinct),
             "views_vs_current": {src: view_diffs(plans_by_src[src], names) for src in SOURCES},
             "crop_decode_vs_full_scaled": {src: crop_decode_check(plans_by_src[src]) for src in SOURCES},
             "other_flavours": flavour_diffs(distinct[0] if args.quick else distinct[-1]),
             "full_tolerance_max_abs": FULL_TOL}
    k = 4 if args.quick else 16
    replica = pipeline_replica_check(plans_by_src["500x375"][:k] + plans_by_src["1000x750"][:k])
    quality = capped_quality(plans_by_src["1000x750"], capped_plans)

    # ------------------------------------------------------------------ print
    print(f"\n## JPEG decode levers, img/s per core (CPU time, median of {args.rounds} interleaved rounds, "
          f"{args.n} images per source, 1 thread, {SIZE}px views; x = median of per-round ratios to current)\n")
    print("| decoder | " + " | ".join(f"{s} decode | x | {s} +resize | x" for s in SOURCES) + " |")
    print("|---|" + "---:|" * 4 * len(SOURCES))
    for name in names:
        cells = []
        for src in SOURCES:
            for stage in ("decode", "render"):
                r = out_rows[f"{stage}:{name}@{src}"]
                cells += [f"{r['img_per_s_median']:,.0f}", f"{r['ratio_to_current_paired']:.2f}"]
        print(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    print("\nPre-resized 1000x750 sources, decode + crop + resize (x: vs current on the same source; "
          "x1000: vs current on 1000x750; both medians of per-round ratios):\n")
    print("| source | decoder | img/s | x | x1000 | upsampled views | view MAE vs 1000x750 | PSNR dB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    q = quality["1000x750 current (draft)"]
    r = out_rows["render:current@1000x750"]
    print(f"| 1000x750 | current | {r['img_per_s_median']:,.0f} | 1.00 | 1.00 | 0% | {q['mean_abs']:.2f} | {q['psnr_db']:.1f} |")
    for cap in CAPS:
        qc = quality[f"cap{cap}"]
        for name in ("current", "sj_scaled", "tj_crop"):
            k = f"render:{name}@cap{cap}"
            if k in out_rows:
                r = out_rows[k]
                print(f"| {meta[f'cap{cap}']['size'][0]}x{meta[f'cap{cap}']['size'][1]} | {name} | "
                      f"{r['img_per_s_median']:,.0f} | {r['ratio_to_current_paired']:.2f} | "
                      f"{r['ratio_to_current_1000x750']:.2f} | "
                      f"{qc['upsampled_fraction']:.0%} | {qc['mean_abs']:.2f} | {qc['psnr_db']:.1f} |")
    if ladder_factors:
        print("\nPyTurboJPEG decode-only at each DCT scale, 1000x750: " + ", ".join(
            f"{k.split(':')[1].split('@')[0]} {med[k]:,.0f}" for k in rows if k.startswith("ladder:")) + " img/s")
    print("\nPixels, full decode vs Pillow: " + ", ".join(
        f"{k} max {v['max_abs']} mean {v['mean_abs']:.4f}" for k, v in pixel["full_vs_pillow"].items()))
    print("Pixels, scaled decode vs Pillow draft: " + ", ".join(
        f"{k} {s} max {v['max_abs']}" for k, per in pixel["scaled_vs_pillow_draft"].items() for s, v in per.items()))
    for fl, res in pixel["other_flavours"].items():
        print(f"{fl}: " + "; ".join(f"{k} " + ", ".join(f"{s_}={v}" for s_, v in per.items()) for k, per in res.items()))
    for src in SOURCES:
        print(f"Views vs current, {src}: " + ", ".join(
            f"{k} max {v['max_abs']} mean {v['mean_abs']:.3f} same {v['identical_items']}/{v['items']}"
            for k, v in pixel["views_vs_current"][src].items()))
        c = pixel["crop_decode_vs_full_scaled"][src]
        if c:
            print(f"Crop-decode vs full scaled decode, {src}: {c['mismatching_crops']} of {c['crops']} crops differ "
                  f"(max {c['max_abs']}); region smaller than image for {c['region_smaller_than_image']}; "
                  f"scales {meta[src]['scale_denominators']}")
    print(f"current-path mirror vs pipeline.replay: {replica}")

    result = {
        "config": {"n": args.n, "rounds": args.rounds, "block": args.block, "quick": args.quick, "image_size": SIZE,
                   "crop_scale": list(SCALE), "crop_ratio": list(RATIO), "jpeg_quality": 90, "caps": list(CAPS),
                   "timer": "process_time (CPU s of this process), 1 torch thread"},
        "env": _lib_versions(),
        "decoders": {name: available(name) for name in DECODERS},
        "sources": meta,
        "rows": out_rows,
        "pixel_diff": pixel,
        "capped_quality": quality,
        "replica_matches_pipeline": replica,
        "setup_s": setup_s,
        "timing_s": timing_s,
        "wall_s": time.perf_counter() - t0,
    }
    save_json(args.out, result)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
