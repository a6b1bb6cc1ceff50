"""The pixel fingerprint: hashes of a few fixed views, rendered from fixed inputs through the real replay path.

The replay contract fixes the params of every view; its pixels come from libraries (torch, torchvision, Pillow,
simplejpeg) that a range of versions may render differently. Stage one records the fingerprint in the store;
stage two renders it again and refuses the store when a view differs (the cached targets would belong to other
pixels), naming the first differing view and the versions on both sides.

Inputs: fingerprint.png (lossless: Pillow's decode) and fingerprint.jpg (4:2:0, decoded by simplejpeg, at full
size and at a reduced DCT scale), 64x48, shipped beside this module. Each is rendered under both filters, with
explicit params that cover the crop-resize, flip, colour jitter, every RandAugment op, erasing, mixup and the
eval crop. A fingerprint costs about 0.1 s, once per process (tests/test_fingerprint.py measures it).
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata, resources

import torch

from pipeline.errors import PixelMismatch
from pipeline.replay.mixing import mix_images
from pipeline.replay.view_params import INTERPOLATIONS, AugmentConfig, eval_params
from pipeline.replay.pixels import SourceImage, apply

VERSION = 1  # of the record below: bump when the views or inputs change (a stored record then is not compared)
LIBRARIES = ("torch", "torchvision", "pillow", "simplejpeg", "numpy")
INPUTS = ("png", "jpg")
SIZE = 16  # view side: a 48-64 px crop of the 64x48 inputs decodes the JPEG at a reduced DCT scale
# name -> params of one training view (pixels.apply's keys; digests and samplers are not involved)
VIEWS = {
    "full-crop": {"crop": [0, 0, 48, 64], "flip": False, "erase": None},  # JPEG: DCT scale 1/2
    "small-crop-flip": {"crop": [10, 20, 20, 25], "flip": True, "erase": None},  # full-size decode
    "rotate-shear": {"crop": [4, 6, 40, 40], "flip": False, "erase": None,
                     "ra": [["Rotate", 17.3], ["ShearX", 0.21]]},
    "shear-translate": {"crop": [0, 8, 48, 48], "flip": True, "erase": None,
                        "ra": [["ShearY", -0.15], ["TranslateXRel", 5], ["TranslateYRel", -3]]},
    "colour-erase": {"crop": [5, 5, 30, 30], "flip": False, "erase": [2, 3, 5, 6, 12345],
                     "jitter": [[1.2, 0.8, 1.1], [2, 0, 1]],
                     "ra": [["AutoContrast", None], ["Equalize", None], ["PosterizeIncreasing", 3],
                            ["SolarizeIncreasing", 200]]},
    "tone": {"crop": [8, 10, 32, 40], "flip": True, "erase": None,
             "ra": [["ColorIncreasing", 1.5], ["ContrastIncreasing", 0.6], ["BrightnessIncreasing", 1.3],
                    ["SharpnessIncreasing", 1.8], ["SolarizeAdd", 60], ["Invert", None]]},
}


def renderer_versions() -> dict:
    """Installed versions of the libraries whose code renders the pixels (None where not installed)."""
    out = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@functools.cache
def fingerprint() -> dict:
    """{"version", "views": {name: sha256[:16] of the view's uint8 pixels}, "versions"}, computed once a process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # pixels do not depend on it; ~0.1 s on one thread, several times that on a busy pool
    try:
        views = _views()
    finally:
        torch.set_num_threads(threads)
    return {"version": VERSION, "views": views, "versions": renderer_versions()}


def _views() -> dict[str, str]:
    views = {}
    for fmt in INPUTS:
        data = (resources.files("pipeline.replay") / f"fingerprint.{fmt}").read_bytes()
        for interp in INTERPOLATIONS:
            cfg = AugmentConfig(image_size=SIZE, rand_augment=None, interpolation=interp, crop_pct=0.875)
            for name, image in _render(data, cfg).items():
                views[f"{fmt}-{interp}-{name}"] = _hash(image)
    return views


def _render(data: bytes, cfg: AugmentConfig) -> dict[str, torch.Tensor]:
    src = SourceImage(data)
    out = {name: src.render(params, cfg) for name, params in VIEWS.items()}
    out["mixup"] = mix_images(out["full-crop"], out["rotate-shear"], {"mode": "mixup", "lam": 0.37})
    image, scale = src.decode()
    out["eval"] = apply(image, eval_params((src.size[1], src.size[0]), cfg), cfg, scale)
    return out


def _hash(image: torch.Tensor) -> str:
    blob = repr((image.dtype, tuple(image.shape))).encode() + image.contiguous().numpy().tobytes()
    return hashlib.sha256(blob).hexdigest()[:16]


def check(recorded: dict, where: str) -> None:
    """Raise PixelMismatch when this process renders a view of ``recorded`` (a store's fingerprint) otherwise."""
    ours = fingerprint()
    if recorded.get("version") != ours["version"]:
        raise PixelMismatch(f"{where}: pixel fingerprint version {recorded.get('version')}, this code renders "
                            f"version {ours['version']}: rebuild the cache (overwrite=true)")
    theirs = recorded.get("views") or {}
    differ = [n for n in ours["views"] if theirs.get(n) != ours["views"][n]]
    if differ:
        raise PixelMismatch(
            f"{where}: view '{differ[0]}' of the pixel fingerprint renders differently here ({len(differ)} of "
            f"{len(ours['views'])} views differ): built with {_versions(recorded.get('versions'))}, running "
            f"{_versions(ours['versions'])}; the cached targets belong to other pixels: install the versions it was "
            f"built with, or rebuild the cache under these (python -m pipeline.teacher_cache overwrite=true)")


def _versions(v: dict | None) -> str:
    return ", ".join(f"{k} {(v or {}).get(k, '?')}" for k in LIBRARIES)
