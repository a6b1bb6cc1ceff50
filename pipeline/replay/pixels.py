"""Pixels: decode a source image and render view params on it (torchvision's functional ops on uint8 tensors).

`render(img, params, cfg)` = `apply(decode(img, params), params, cfg)`; every pixel operation is deterministic
given the params, so a view rendered twice is the same bytes (docs/design.md, section 3).
"""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms.functional import _get_inverse_affine_matrix
from torchvision.transforms.v2.functional._geometry import _affine_grid as _tv_affine_grid, _apply_grid_transform
from PIL import Image

from pipeline.replay import seeding
from pipeline.replay.view_params import AugmentConfig

import simplejpeg

# Fill colour of geometric RandAugment ops: timm's img_mean hparam for ImageNet mean (round(255 * mean)).
FILL = [124, 116, 104]

def open_image(data: bytes) -> Image.Image:
    """Lazy PIL image: its size is known from the header before any pixel is decoded."""
    return Image.open(io.BytesIO(data))


def decode(img: Image.Image, params_for_size=None, out_size: int | None = None) -> tuple[torch.Tensor, float]:
    """Decode to a uint8 CHW RGB tensor. With a crop known in advance, JPEGs decode at a reduced DCT scale
    (1/2, 1/4, 1/8) whenever the crop still has at least `out_size` pixels per side; returns the scale.

    The tensor is a CHW view of the decoder's HWC buffer (channels-last strides, no copy). RGB/grey JPEGs go
    through simplejpeg at the scale Pillow's draft picked: the same libjpeg-turbo output as Pillow's, bit for bit
    (full and reduced scales, baseline and progressive, 4:2:0/4:2:2/4:4:4, grey), measured 1.2-1.3x faster per
    core than Pillow or torchvision.io (bench/bench_decode.py); other images go through Pillow."""
    return decode_drafted(img, draft(img, params_for_size, out_size))


def decode_drafted(img: Image.Image, scale: float) -> tuple[torch.Tensor, float]:
    """decode() of an image draft() has already set up at `scale`."""
    if img.format == "JPEG" and img.mode in ("RGB", "L") and isinstance(getattr(img, "fp", None), io.BytesIO):
        width, height = img.size  # after draft(): the size at this scale
        arr = simplejpeg.decode_jpeg(img.fp.getvalue(), colorspace="RGB", min_height=height, min_width=width)
        if arr.shape[:2] == (height, width):  # libjpeg-turbo picks the smallest scale >= the request: Pillow's
            return torch.from_numpy(arr).permute(2, 0, 1), scale
    if img.mode != "RGB":
        img = img.convert("RGB")
    with warnings.catch_warnings():  # Pillow's array is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        arr = torch.from_numpy(np.asarray(img))
    return arr.permute(2, 0, 1), scale


def draft(img: Image.Image, params_for_size=None, out_size: int | None = None) -> float:
    """Set up the reduced DCT scale decode() uses for this view's crop (nothing is decoded yet); returns it.

    A function of the view's own crop only: JPEGs whose crop keeps at least 2x `out_size` per side decode at
    the largest of 1/2, 1/4, 1/8 that Pillow's draft allows; everything else at 1.0."""
    request = draft_request(img.format, img.size, params_for_size, out_size)
    if request is None:
        return 1.0
    w0 = img.size[0]
    img.draft("RGB", request)
    return img.size[0] / w0


def draft_request(fmt: str | None, size: tuple[int, int], params_for_size=None,
                  out_size: int | None = None) -> tuple[int, int] | None:
    """The size draft() asks Pillow for (it picks the DCT scale from it), or None for a full-size decode."""
    if fmt != "JPEG" or params_for_size is None:
        return None
    _, _, ch, cw = params_for_size["crop"]
    factor = min(ch, cw) / out_size
    if factor < 2:
        return None
    w0, h0 = size
    return int(math.ceil(w0 / factor)), int(math.ceil(h0 / factor))


class SourceImage:
    """One encoded image rendered into several views (a group of seed indices, or r repeats): the header is
    read once and each distinct decode scale is decoded once, so G views that all need the full-size image cost
    one decode. Every view still decodes at the scale its own crop picks (pixels.draft), so its pixels are those
    of render(open_image(data), params, cfg), bit for bit, however views are grouped (docs/design.md, sec. 3)."""

    def __init__(self, data: bytes):
        self.data = data
        self._lazy: Image.Image | None = open_image(data)  # header only; also serves the first decode
        self.size = self._lazy.size  # (width, height), as PIL
        self.format = self._lazy.format
        self._decoded: dict[float, tuple[torch.Tensor, float]] = {}  # scale -> decode()'s result
        self._scale_of: dict[tuple[int, int] | None, float] = {None: 1.0}  # draft request -> Pillow's scale

    def decode(self, params_for_size=None, out_size: int | None = None) -> tuple[torch.Tensor, float]:
        """decode(open_image(data), params_for_size, out_size), memoised by the scale the crop picks."""
        request = draft_request(self.format, self.size, params_for_size, out_size)
        hit = self._decoded.get(self._scale_of.get(request))
        if hit is not None:
            return hit
        # draft() configures a lazy image once, for one scale: a decode at another scale needs a fresh one
        img, self._lazy = (self._lazy if self._lazy is not None else open_image(self.data)), None
        scale = self._scale_of[request] = draft(img, params_for_size, out_size)
        hit = self._decoded.get(scale)
        if hit is None:
            hit = self._decoded[scale] = decode_drafted(img, scale)
        return hit

    def render(self, params: dict, cfg: AugmentConfig) -> torch.Tensor:
        image, scale = self.decode(params, cfg.image_size)
        return apply(image, params, cfg, scale)


def interpolation_mode(name: str):
    return {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC}[name]


def apply_op_image(img: torch.Tensor, name: str, arg, interpolation: str = "bilinear") -> torch.Tensor:
    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if name == "Invert":
        return F.invert(img)
    if name == "Rotate":
        return _rotate(img, arg, interpolation)
    if name == "ShearX":
        return _shear(img, arg, 0, interpolation)
    if name == "ShearY":
        return _shear(img, arg, 1, interpolation)
    if name == "TranslateXRel":
        return translate(img, arg, 0)
    if name == "TranslateYRel":
        return translate(img, 0, arg)
    if name == "PosterizeIncreasing":
        return F.posterize(img, arg)  # 0 bits -> black; Pillow 13 would raise here
    if name == "SolarizeIncreasing":
        return img if arg > 255 else F.solarize(img, arg)
    if name == "SolarizeAdd":
        return torch.where(img < 128, (img.to(torch.int16) + arg).clamp_(max=255).to(torch.uint8), img)
    if name == "ColorIncreasing":
        return F.adjust_saturation(img, arg)
    if name == "ContrastIncreasing":
        return F.adjust_contrast(img, arg)
    if name == "BrightnessIncreasing":
        return F.adjust_brightness(img, arg)
    if name == "SharpnessIncreasing":
        return sharpness(img, arg)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _rotate(img: torch.Tensor, angle: float, interpolation: str) -> torch.Tensor:
    if interpolation == "bilinear":
        return F.rotate(img, angle, interpolation=interpolation_mode(interpolation), fill=FILL)
    if angle % 360 == 0:  # torchvision's copy fast path (|angle| <= 30 here: 90/180/270 never occur)
        return img.clone()
    return _affine_bicubic(img, _get_inverse_affine_matrix([0.0, 0.0], -(angle % 360), [0.0, 0.0], 1.0, [0.0, 0.0]))


def _shear(img: torch.Tensor, factor: float, axis: int, interpolation: str) -> torch.Tensor:
    shear = [0.0, 0.0]
    shear[axis] = math.degrees(math.atan(factor))
    if interpolation == "bilinear":
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear,
                        interpolation=interpolation_mode(interpolation), fill=FILL)
    return _affine_bicubic(img, _get_inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 0.0], 1.0, shear))


def _affine_bicubic(img: torch.Tensor, matrix: list[float]) -> torch.Tensor:
    """F.affine/F.rotate about the centre with fill=FILL, bicubic: torchvision's tensor kernels accept only
    nearest/bilinear, so this runs their own grid and fill blend (_affine_grid, _apply_grid_transform) with
    grid_sample's bicubic. Clamped to [0, 255] before rounding, as torchvision's bicubic resize does: bicubic
    overshoots at edges, and a bare cast to uint8 would wrap -3 to 253."""
    c, h, w = img.shape
    theta = torch.tensor(matrix, dtype=torch.float32).reshape(1, 2, 3)
    grid = _tv_affine_grid(theta, w=w, h=h, ow=w, oh=h)
    out = _apply_grid_transform(img.float(), grid, "bicubic", fill=FILL)
    return out.clamp_(0, 255).round_().to(torch.uint8)


def translate(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """F.affine(img, translate=[dx, dy], NEAREST, fill=FILL), pixel for pixel: with whole-pixel offsets the
    nearest-neighbour grid lands on source pixels, so it is a shifted copy on a FILL canvas (~60x cheaper than
    the float grid_sample)."""
    c, h, w = img.shape
    out = torch.tensor(FILL, dtype=img.dtype).view(c, 1, 1).expand(c, h, w).clone()
    if abs(dx) < w and abs(dy) < h:
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[:, yd, xd] = img[:, ys, xs]
    return out


def sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
    """F.adjust_sharpness for uint8, pixel for pixel, without the depthwise conv2d: torchvision rounds the
    (1,1,1; 1,5,1; 1,1,1)/13 blur, and an integer sum over 13 is never within 1/26 of a rounding tie, so the
    exact sum (integers in float32) divided and rounded gives the same blur; the blend is torchvision's own."""
    c, h, w = img.shape
    if h <= 2 or w <= 2:
        return img
    output = img.to(dtype=torch.float32, copy=True)
    r = output[:, :, :-2] + output[:, :, 1:-1]
    r += output[:, :, 2:]
    s = r[:, :-2] + r[:, 1:-1]
    s += r[:, 2:]
    view = output[..., 1:-1, 1:-1]
    blurred = s.add_(view, alpha=4.0).div_(13.0).round_()
    view.add_(blurred.sub_(view), alpha=(1.0 - factor))
    return output.clamp_(0, 255).to(torch.uint8)


def erase_fill(fill_seed: int, shape) -> torch.Tensor:
    """Per-pixel noise for an erased box, from the view's own generator (uniform uint8: ~10x cheaper than
    normal noise from Philox, and the box still carries no image information)."""
    rng = seeding.generator(fill_seed, seeding.FILL)
    return torch.from_numpy(rng.integers(0, 256, size=shape, dtype=np.uint8))


def apply(image: torch.Tensor, params: dict, cfg: AugmentConfig, scale: float = 1.0) -> torch.Tensor:
    """Render one unmixed view: uint8 [3, H, W] source (decoded at `scale`) -> uint8 [3, S, S]."""
    out = crop_resize_image(image, params, cfg, scale)
    if params["flip"]:
        out = F.horizontal_flip(out)
    if "jitter" in params:
        (b, c, s), order = params["jitter"]
        for k in order:
            out = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)[k](out, (b, c, s)[k])
    for name, arg in params.get("ra", ()):
        out = apply_op_image(out, name, arg, cfg.interpolation)
    if params["erase"] is not None:
        out = _erase(out, params["erase"])
    return out.contiguous()


def crop_resize_image(image: torch.Tensor, params: dict, cfg: AugmentConfig, scale: float = 1.0) -> torch.Tensor:
    """The crop box (rescaled to the decoded size) resized to the view: contiguous uint8 [3, S, S].

    From decode()'s channels-last view this runs torch's uint8 antialiased resize in its native HWC layout
    (about twice as fast as from a CHW-contiguous copy, same pixels)."""
    size = cfg.image_size
    top, left, h, w = params["crop"]
    if scale != 1.0:
        top, left = int(round(top * scale)), int(round(left * scale))
        h = max(1, min(int(round(h * scale)), image.shape[1] - top))
        w = max(1, min(int(round(w * scale)), image.shape[2] - left))
    out = F.resized_crop(image, top, left, h, w, [size, size], interpolation=interpolation_mode(cfg.interpolation),
                         antialias=True)
    return out.contiguous()


def _erase(out: torch.Tensor, erase: list[int]) -> torch.Tensor:
    et, el, eh, ew, seed = erase
    out = out.clone()
    out[:, et:et + eh, el:el + ew] = erase_fill(seed, (3, eh, ew))
    return out


def render(img: Image.Image, params: dict, cfg: AugmentConfig) -> torch.Tensor:
    """Decode (reduced-size where the crop allows) and apply."""
    image, scale = decode(img, params, cfg.image_size)
    return apply(image, params, cfg, scale)
