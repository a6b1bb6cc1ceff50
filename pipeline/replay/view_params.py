"""View parameters: `sample_params(rng, src_size, cfg)` draws plain, JSON-able numbers for one view.

Sampling follows timm's DeiT recipe (RandomResizedCrop, flip, RandAugment `rand-m9-mstd0.5-inc1`,
RandomErasing). Every draw comes from the view's own counter-based generator (pipeline.replay.seeding), so the
same (run_seed, seed index, sample) gives the same params under any loader layout; the params are what the
digest covers (docs/design.md, section 3). Rendering them is pipeline.replay.pixels.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.config_rules import INTERPOLATIONS, MIX_PAIRINGS, timm_rand_augment

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
        ra = timm_rand_augment(config_str)
        op = ra.ops[0]
        return cls(
            ops=tuple(o.name for o in ra.ops),
            num_layers=int(ra.num_layers),
            magnitude=float(op.magnitude),
            magnitude_std=float(op.magnitude_std),
            magnitude_max=float(op.magnitude_max or _LEVEL_DENOM),
            prob=float(op.prob),
        )


IMPLIED = {"mix_pairing": "pair"}  # keys added to the recipe later: absent from the canonical dict at this value


@dataclass(frozen=True)
class AugmentConfig:
    """The augmentation recipe (pipeline/conf/augment/*.yaml) plus the view size; hashed into the cache provenance."""

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
    mix_pairing: str = "pair"  # who draws mode and lambda: each pair, or the whole block (pipeline.replay.mixing)
    label_smoothing: float = 0.1
    interpolation: str = "bicubic"  # crop resize, RandAugment geometry and eval resize alike
    crop_pct: float = 1.0  # eval transform only
    ra: RandAugmentSpec | None = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        if self.rand_augment:
            object.__setattr__(self, "ra", RandAugmentSpec.parse(self.rand_augment))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"augment.interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if self.mix_block < 2:
            raise ValueError(f"augment.mix_block must be >= 2, got {self.mix_block}")
        if self.mix_pairing not in MIX_PAIRINGS:
            raise ValueError(f"augment.mix_pairing must be one of {MIX_PAIRINGS}, got {self.mix_pairing!r}")

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
        for key, value in IMPLIED.items():
            if d[key] == value:  # the views before the key existed: their hash and stores stay valid
                d.pop(key)
        return d

    def hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rounded(x: float) -> float:
    """A float as stored in params (6 decimals)."""
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


def level_arg(name: str, level: float, negate: bool, size: int):
    """timm's level_to_arg for the increasing op set; the sign is drawn by the caller, not by `random`."""
    sign = -1.0 if negate else 1.0
    frac = level / _LEVEL_DENOM
    if name == "Rotate":
        return rounded(sign * frac * 30.0)
    if name in ("ShearX", "ShearY"):
        return rounded(sign * frac * 0.3)
    if name in ("TranslateXRel", "TranslateYRel"):
        return int(round(sign * frac * 0.45 * size))  # pixels of the view
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return rounded(max(0.1, 1.0 + sign * frac * 0.9))
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
            ops.append([name, level_arg(name, level, negate, size)])
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
        factors = [rounded(rng.uniform(lo, hi)) for _ in range(3)]
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


def augment_config(cfg: DictConfig, augment=None) -> AugmentConfig:
    """The replay recipe of this run (``augment``, default ``cfg.augment``) at the data's view size."""
    aug = cfg.augment if augment is None else augment
    return AugmentConfig.from_cfg(OmegaConf.to_container(aug, resolve=True), cfg.data.image_size, cfg.data.crop_pct)
