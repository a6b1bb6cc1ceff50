"""Pixel checks of bench_decode.py: every decoder against Pillow (full size, DCT scales, other JPEG flavours),
the crop-then-decode against the same library's full decode, every view against the pipeline's, the bench's
render against the pipeline's own crop + resize, and what a pre-resized (capped) source costs a view."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from bench.decode_levers import (DECODE_FNS, SIZE, TJ, Plan, available, crop_region, dec_current, dec_pil_draft,
                                 dec_pil_full, dec_tj_crop, dec_tj_scaled, dec_tv_full, dec_sj_full, dec_tj_full,
                                 render, sample_boxes, scaled_box, turbojpeg)
from pipeline.replay import pixels
from pipeline.replay.view_params import AugmentConfig


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
                    sub = TJ.decode_header(b)[2]
                    mcu = (turbojpeg.tjMCUWidth[sub], turbojpeg.tjMCUHeight[sub])
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
            if TJ is not None:
                boxes = sample_boxes(8, (w0, h0), seed=d)
                sub = TJ.decode_header(b)[2]
                mcu = (turbojpeg.tjMCUWidth[sub], turbojpeg.tjMCUHeight[sub])
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
    if TJ is None:
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


def pipeline_replica_check(plans: list[Plan]) -> dict:
    """The bench's render (crop box + resize of any decoder's pixels) against the pipeline's own
    pixels.crop_resize_image on the pipeline's decode: the rows time the pipeline's views."""
    cfg = AugmentConfig(image_size=SIZE, interpolation="bilinear")  # render() is bilinear
    same = 0
    for p in plans:
        image, scale, _ = dec_current(p)
        ours = pixels.crop_resize_image(image, {"crop": p.crop}, cfg, scale)
        same += torch.equal(ours, render(p, (image, scale, (0, 0))))
    return {"matches": same == len(plans), "checked": len(plans), "module": pixels.__name__}


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
