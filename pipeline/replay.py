"""Replayable augmentation: `sample_params(rng, ...)` draws plain numbers, `apply(image, params)` renders them.

Parameter sampling follows timm's DeiT recipe (RandomResizedCrop, flip, RandAugment `rand-m9-mstd0.5-inc1`,
RandomErasing); the pixel work is torchvision's functional ops on uint8 tensors. Because every draw comes
from the view's own counter-based generator (pipeline.seeding), the same (run_seed, seed index, sample)
gives the same params under any loader layout, and the params are what the digest covers.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image

from pipeline import seeding

try:  # deprecated in torchvision 0.29 in favour of TorchCodec; Pillow decodes when it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = None

# Fill colour of geometric RandAugment ops: timm's img_mean hparam for ImageNet mean (round(255 * mean)).
FILL = [124, 116, 104]
_LEVEL_DENOM = 10.0
_ROUND = 6  # floats in params are rounded so digests do not hinge on the last bit of a libm call


@dataclass(frozen=True)
class RandAugmentSpec:
    ops: tuple[str, ...]
    num_layers: int
    magnitude: float
    magnitude_std: float
    magnitude_max: float
    prob: float

    @classmethod
    def parse(cls, config_str: str) -> "RandAugmentSpec":
        # timm parses its own syntax; we read the op set and settings off its objects and sample ourselves.
        from timm.data.auto_augment import rand_augment_transform

        ra = rand_augment_transform(config_str, {})
        if ra.choice_weights is not None:
            raise ValueError(f"augment.rand_augment={config_str!r}: weighted op choice is not supported")
        op = ra.ops[0]
        return cls(
            ops=tuple(o.name for o in ra.ops),
            num_layers=int(ra.num_layers),
            magnitude=float(op.magnitude),
            magnitude_std=float(op.magnitude_std),
            magnitude_max=float(op.magnitude_max or _LEVEL_DENOM),
            prob=float(op.prob),
        )


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation recipe (conf/augment/*.yaml) plus the view size; hashed into the cache provenance."""

    image_size: int
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.0
    erase_prob: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    mix_block: int = 32
    label_smoothing: float = 0.1
    interpolation: str = "bilinear"
    crop_pct: float = 1.0  # eval transform only
    ra: RandAugmentSpec | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        if self.rand_augment:
            object.__setattr__(self, "ra", RandAugmentSpec.parse(self.rand_augment))
        if self.mix_block < 2:
            raise ValueError(f"augment.mix_block must be >= 2, got {self.mix_block}")

    @classmethod
    def from_cfg(cls, augment, image_size: int, crop_pct: float = 1.0) -> "AugmentConfig":
        d = dict(augment)
        return cls(image_size=int(image_size), crop_pct=float(crop_pct), **d)

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def canonical(self) -> dict:
        d = asdict(self)
        d.pop("ra")
        return d

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _r(x: float) -> float:
    return round(float(x), _ROUND)


# ---------------------------------------------------------------- parameter sampling (pure, ours)


def sample_crop(rng: np.random.Generator, height: int, width: int, scale, ratio) -> list[int]:
    """torchvision/timm RandomResizedCrop.get_params with an explicit generator: [top, left, h, w]."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return [top, left, h, w]
    # Fallback: central crop at the nearest allowed ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


def _level_arg(name: str, level: float, negate: bool, size: int):
    """timm's level_to_arg for the increasing op set; the sign is drawn by the caller, not by `random`."""
    sign = -1.0 if negate else 1.0
    frac = level / _LEVEL_DENOM
    if name == "Rotate":
        return _r(sign * frac * 30.0)
    if name in ("ShearX", "ShearY"):
        return _r(sign * frac * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return int(round(sign * frac * 0.45 * size))  # pixels of the view
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return _r(max(0.1, 1.0 + sign * frac * 0.9))
    if name == "PosterizeIncreasing":
        return 4 - int(frac * 4)  # bits kept; 0 at magnitude 10 (black image, as old Pillow did)
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(frac * 256))
    if name == "SolarizeAdd":
        return min(128, int(frac * 110))
    return None  # AutoContrast, Equalize, Invert


def sample_rand_augment(rng: np.random.Generator, spec: RandAugmentSpec, size: int) -> list[list]:
    """Ops applied to this view, as [name, arg]. Skipped layers (prob) are left out."""
    ops = []
    for _ in range(spec.num_layers):
        name = spec.ops[int(rng.integers(len(spec.ops)))]
        # Draw every number whether or not the op runs, so the stream shape is fixed.
        run = rng.random() < spec.prob
        mag = rng.normal(spec.magnitude, spec.magnitude_std) if spec.magnitude_std > 0 else spec.magnitude
        negate = rng.random() > 0.5
        if run:
            level = max(0.0, min(float(mag), spec.magnitude_max))
            ops.append([name, _level_arg(name, level, negate, size)])
    return ops


def sample_erase(rng: np.random.Generator, size: int, prob: float) -> list[int] | None:
    """timm RandomErasing (count 1, area 2%-1/3, aspect 0.3-3.3): [top, left, h, w, fill_seed] or None."""
    if prob <= 0 or rng.random() >= prob:
        return None
    area = size * size
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(10):
        target_area = area * rng.uniform(0.02, 1 / 3)
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if 0 < w < size and 0 < h < size:
            top = int(rng.integers(0, size - h + 1))
            left = int(rng.integers(0, size - w + 1))
            return [top, left, h, w, int(rng.integers(0, 2**62))]
    return None


def sample_params(rng: np.random.Generator, src_size: tuple[int, int], cfg: AugmentConfig) -> dict:
    """All parameters of one (unmixed) training view. `src_size` is the decoded (height, width)."""
    height, width = src_size
    size = cfg.image_size
    params = {"src": [int(height), int(width)],
              "crop": sample_crop(rng, height, width, cfg.crop_scale, cfg.crop_ratio),
              "flip": bool(rng.random() < cfg.hflip)}
    if cfg.color_jitter > 0:
        lo, hi = max(0.0, 1 - cfg.color_jitter), 1 + cfg.color_jitter
        factors = [_r(rng.uniform(lo, hi)) for _ in range(3)]
        params["jitter"] = [factors, [int(v) for v in rng.permutation(3)]]
    if cfg.ra is not None:
        params["ra"] = sample_rand_augment(rng, cfg.ra, size)
    params["erase"] = sample_erase(rng, size, cfg.erase_prob)
    return params


def eval_params(src_size: tuple[int, int], cfg: AugmentConfig) -> dict:
    """Resize the shorter side to size/crop_pct, centre-crop size: expressed as one crop box on the source."""
    height, width = src_size
    resized_short = int(math.floor(cfg.image_size / cfg.crop_pct))
    side = min(height, width) * cfg.image_size / resized_short
    h = w = max(1, int(round(side)))
    return {"src": [int(height), int(width)], "crop": [(height - h) // 2, (width - w) // 2, h, w], "flip": False,
            "erase": None}


# ---------------------------------------------------------------- pixels (torchvision ops)


def open_image(data: bytes) -> Image.Image:
    """Lazy PIL image: its size is known from the header before any pixel is decoded."""
    return Image.open(io.BytesIO(data))


def decode(img: Image.Image, params_for_size=None, out_size: int | None = None) -> tuple[torch.Tensor, float]:
    """Decode to a uint8 CHW RGB tensor. With a crop known in advance, JPEGs decode at a reduced DCT scale
    (1/2, 1/4, 1/8) whenever the crop still has at least `out_size` pixels per side; returns the scale.

    The tensor is a CHW view of the decoder's HWC buffer (channels-last strides, no copy); treat it as
    read-only. Full-size RGB/grey JPEGs go through torchvision.io.decode_jpeg (the same libjpeg-turbo
    output as Pillow's, bit for bit, without Pillow's copies)."""
    scale = 1.0
    if img.format == "JPEG":
        if params_for_size is not None:
            _, _, ch, cw = params_for_size["crop"]
            factor = min(ch, cw) / out_size
            if factor >= 2:
                w0, h0 = img.size
                img.draft("RGB", (int(math.ceil(w0 / factor)), int(math.ceil(h0 / factor))))
                scale = img.size[0] / w0
        if (scale == 1.0 and decode_jpeg is not None and img.mode in ("RGB", "L")
                and isinstance(getattr(img, "fp", None), io.BytesIO)):
            data = torch.frombuffer(bytearray(img.fp.getvalue()), dtype=torch.uint8)
            return decode_jpeg(data, mode=ImageReadMode.RGB), scale
    if img.mode != "RGB":
        img = img.convert("RGB")
    with warnings.catch_warnings():  # Pillow's array is read-only; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        arr = torch.from_numpy(np.asarray(img))
    return arr.permute(2, 0, 1), scale


def _interp(name: str):
    return {"bilinear": F.InterpolationMode.BILINEAR, "bicubic": F.InterpolationMode.BICUBIC,
            "nearest": F.InterpolationMode.NEAREST}[name]


def _apply_op(img: torch.Tensor, name: str, arg) -> torch.Tensor:
    bil = F.InterpolationMode.BILINEAR
    if name == "AutoContrast":
        return F.autocontrast(img)
    if name == "Equalize":
        return F.equalize(img)
    if name == "Invert":
        return F.invert(img)
    if name == "Rotate":
        return F.rotate(img, arg, interpolation=bil, fill=FILL)
    if name == "ShearX":
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(arg)), 0.0],
                        interpolation=bil, fill=FILL)
    if name == "ShearY":
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(arg))],
                        interpolation=bil, fill=FILL)
    if name == "TranslateXRel":
        return _translate(img, arg, 0)
    if name == "TranslateYRel":
        return _translate(img, 0, arg)
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
        return _sharpness(img, arg)
    raise ValueError(f"unknown RandAugment op {name!r}")


def _translate(img: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
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


def _sharpness(img: torch.Tensor, factor: float) -> torch.Tensor:
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
    out = _crop_resize(image, params, cfg, scale)
    if params["flip"]:
        out = F.horizontal_flip(out)
    if "jitter" in params:
        (b, c, s), order = params["jitter"]
        for k in order:
            out = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)[k](out, (b, c, s)[k])
    for name, arg in params.get("ra", ()):
        out = _apply_op(out, name, arg)
    if params["erase"] is not None:
        out = _erase(out, params["erase"])
    return out.contiguous()


def _crop_resize(image: torch.Tensor, params: dict, cfg: AugmentConfig, scale: float = 1.0) -> torch.Tensor:
    """The crop box (rescaled to the decoded size) resized to the view: contiguous uint8 [3, S, S].

    From decode()'s channels-last view this runs torch's uint8 antialiased resize in its native HWC layout
    (about twice as fast as from a CHW-contiguous copy, same pixels)."""
    size = cfg.image_size
    top, left, h, w = params["crop"]
    if scale != 1.0:
        top, left = int(round(top * scale)), int(round(left * scale))
        h = max(1, min(int(round(h * scale)), image.shape[1] - top))
        w = max(1, min(int(round(w * scale)), image.shape[2] - left))
    out = F.resized_crop(image, top, left, h, w, [size, size], interpolation=_interp(cfg.interpolation),
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
