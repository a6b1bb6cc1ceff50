"""The decoders bench_decode.py compares, on the same bytes and crop boxes: the pipeline's own decode
(pipeline.replay.pixels.decode: Pillow's draft scale when the crop allows, simplejpeg's libjpeg-turbo), Pillow,
torchvision.io, simplejpeg and PyTurboJPEG at full size, at the pipeline's DCT scale, and PyTurboJPEG's
crop-then-decode; plus the plans (crop box, scale, region) and the render every decoder's pixels go through."""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from pipeline.replay import pixels
from pipeline.replay.view_params import sample_crop

SIZE = 224
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)

with warnings.catch_warnings():  # torchvision 0.29 deprecates torchvision.io in favour of TorchCodec
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg
try:
    import simplejpeg
except ImportError:  # optional: rows are skipped
    simplejpeg = None
try:
    import turbojpeg

    TJ = turbojpeg.TurboJPEG()
except Exception as e:  # ImportError, or OSError/RuntimeError when the system libturbojpeg is missing/too old
    turbojpeg, TJ, TJ_ERROR = None, None, f"{type(e).__name__}: {e}".splitlines()[0]
else:
    TJ_ERROR = None


# ------------------------------------------------------------------------------------------------ plans


def rrc_box(rng: np.random.Generator, height: int, width: int) -> list[int]:
    """The pipeline's own RandomResizedCrop draw (pipeline.replay.view_params.sample_crop): [top, left, h, w]."""
    return sample_crop(rng, height, width, SCALE, RATIO)


def draft_request(crop, src_wh, out_size: int = SIZE):
    """The pipeline's rule (pixels.draft_request): the size passed to Image.draft, or None for a full-size decode."""
    return pixels.draft_request("JPEG", tuple(src_wh), {"crop": crop}, out_size)


def draft_denom(crop, src_wh, out_size: int = SIZE) -> int:
    """The DCT denominator d (1, 2, 4, 8) that Pillow's draft picks for the current rule (JpegImagePlugin.draft):
    the largest of 8, 4, 2, 1 not above min(W // req_w, H // req_h). Deterministic from the view params."""
    req = draft_request(crop, src_wh, out_size)
    if req is None:
        return 1
    s = min(src_wh[0] // req[0], src_wh[1] // req[1])
    return next(d for d in (8, 4, 2, 1) if s >= d)


def scaled_box(crop, scale: float, hs: int, ws: int) -> tuple[int, int, int, int]:
    """The crop box on an image decoded at `scale` (= decoded width / source width), as
    pipeline.replay.pixels.crop_resize_image takes it (checked: decode_checks.pipeline_replica_check)."""
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
        if TJ is not None:
            _, _, sub, _ = TJ.decode_header(data)
            mcu = (turbojpeg.tjMCUWidth[sub], turbojpeg.tjMCUHeight[sub])
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
    """The pipeline's own decode (pipeline.replay.pixels.decode), as its views call it."""
    image, scale = pixels.decode(pixels.open_image(p.data), {"crop": p.crop}, SIZE)
    return image, scale, (0, 0)


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
    TJ.decode_header(p.data)
    return _hwc(TJ.decode(p.data, turbojpeg.TJPF_RGB)), 1.0, (0, 0)


def dec_tj_scaled(p: Plan):
    w0, _, _, _ = TJ.decode_header(p.data)
    if p.d == 1:
        return _hwc(TJ.decode(p.data, turbojpeg.TJPF_RGB)), 1.0, (0, 0)
    arr = TJ.decode(p.data, turbojpeg.TJPF_RGB, scaling_factor=(1, p.d))
    return _hwc(arr), arr.shape[1] / w0, (0, 0)


def dec_tj_crop(p: Plan):
    w0, h0, sub, _ = TJ.decode_header(p.data)
    d = p.d
    mcu = (turbojpeg.tjMCUWidth[sub], turbojpeg.tjMCUHeight[sub])
    x0, y0, w, h = crop_region(p.crop, (w0, h0), d, mcu)  # what the pipeline would compute per view
    sf = None if d == 1 else (1, d)
    data = p.data if (x0, y0, w, h) == (0, 0, w0, h0) else TJ.crop_multiple(p.data, [(x0, y0, w, h)])[0]
    arr = TJ.decode(data, turbojpeg.TJPF_RGB, scaling_factor=sf)
    return _hwc(arr), -(-w0 // d) / w0, (y0 // d, x0 // d), (-(-h0 // d), -(-w0 // d))


DECODE_FNS = {"current": dec_current, "pil_full": dec_pil_full, "pil_draft": dec_pil_draft, "tv_full": dec_tv_full,
              "sj_full": dec_sj_full, "sj_scaled": dec_sj_scaled, "tj_full": dec_tj_full,
              "tj_scaled": dec_tj_scaled, "tj_crop": dec_tj_crop}


def available(name: str) -> bool:
    if name.startswith("sj"):
        return simplejpeg is not None
    if name.startswith("tj"):
        return TJ is not None
    return True


def render(p: Plan, decoded) -> torch.Tensor:
    """The crop box (rescaled as pipeline.replay.pixels.crop_resize_image does) resized to SIZE, contiguous
    uint8 CHW."""
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
            TJ.decode(b, turbojpeg.TJPF_RGB, scaling_factor=sf)
    return run
