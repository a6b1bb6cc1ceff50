"""Image bytes going into shards: checked to decode, and converted to 8-bit when the replay could not render them.

The replay (pipeline.replay.pixels) decodes a stored image and converts it with Pillow's ``convert("RGB")``, which
is right for 8-bit modes but clips 16-bit greyscale (``I;16``, ``I``: a mid-grey 16-bit PNG becomes white) and
float images. :func:`normalised`, used by the folder source of ``make_shards``, decodes every input image in full
once (a truncated or corrupt file is a ShardError naming it) and keeps its bytes as they are (JPEG stays JPEG)
when its mode renders right, else stores an 8-bit PNG:

- ``I;16``, ``I;16L/B/N``, ``I``: 16-bit greyscale, scaled by 255/65535 (``v * 257`` becomes ``v``), clipped;
- ``F``: values in [0, 1] scaled by 255, otherwise taken as 0-255 (Pillow's convention) and clipped;
- ``LAB``: converted to sRGB with Pillow's colour management; ``La``: its grey channel;
- any other mode Pillow can convert to RGB: that conversion.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image

from pipeline.errors import ShardError

KEEP = {"1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LA", "PA", "RGBX", "RGBa", "HSV"}  # convert("RGB") is right
SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def encode_png(arr: np.ndarray) -> bytes:
    """PNG bytes with fixed parameters (deterministic for a given Pillow/zlib)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.getvalue()


def check_decodes(data: bytes, where: str, *, full: bool = False) -> None:
    """Raise ShardError naming ``where`` if ``data`` is not a decodable image.

    ``full=False`` uses PIL ``verify()`` (cheap: headers and, for PNG, chunk CRCs); ``full=True`` decodes
    every pixel.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if full:
                im.load()
            else:
                im.verify()
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError, ...)
        raise ShardError(f"{where}: image does not decode: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def named_decode_errors(manifest, items):
    """Around rendering ``items`` (``(index, image bytes, label)`` of one shard of ``manifest``): an image that does
    not decode raises a ShardError naming the shard and its key; any other error propagates unchanged."""
    try:
        yield
    except ShardError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL and torchvision raise many kinds for a bad image
        named = decode_error(manifest.shard_path(manifest.shard_of(items[0][0])), items, manifest.key_width)
        if named is None:
            raise
        raise named from exc


def decode_error(path, items, key_width: int) -> ShardError | None:
    """For a block of ``(index, image bytes, label)`` of shard ``path`` whose rendering raised: a ShardError naming
    the shard and the key of its first image that does not decode in full, or None (the error was not an image's).
    Only called on that error path, so the hot path decodes each image once."""
    for index, data, _ in items:
        try:
            check_decodes(data, f"{path}: key {int(index):0{key_width}d}", full=True)
        except ShardError as exc:
            return exc
    return None


def normalised(data: bytes, ext: str, where: str) -> tuple[bytes, str]:
    """``(bytes, ext)`` to store for an input image (see the module docstring); ShardError naming ``where`` when
    it does not decode in full or cannot be converted to RGB."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in KEEP:
                return data, ext
            arr = _eight_bit(im)
    except ShardError as exc:
        raise ShardError(f"{where}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a truncated or corrupt file
        raise ShardError(f"{where}: image does not decode: {type(exc).__name__}: {exc}") from exc
    return encode_png(arr), "png"


def capped(data: bytes, ext: str, max_side: int, quality: int, where: str) -> tuple[bytes, str]:
    """``(bytes, ext)`` with the longer side at most ``max_side`` (``data.max_side``, FFCV's max resolution).

    An image within the cap keeps its bytes. A larger one is resized once at ingest (LANCZOS, aspect kept) and
    re-encoded: JPEG stays JPEG at ``quality`` (Pillow's 4:2:0), other formats become a lossless PNG. The replay
    then decodes fewer pixels for every view of every epoch, at the price of a permanent blur: crops smaller
    than ~2x the view lose detail (measured in docs/benchmarks.md, "Data path").
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) <= max_side:
                return data, ext
            im = im.convert("RGB") if im.mode not in ("RGB", "L") else im
            s = max_side / max(im.size)
            size = (max(1, round(im.size[0] * s)), max(1, round(im.size[1] * s)))
            small = im.resize(size, Image.LANCZOS)
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for a truncated or corrupt file
        raise ShardError(f"{where}: image does not decode: {type(exc).__name__}: {exc}") from exc
    if ext != "jpg":
        return encode_png(np.asarray(small)), "png"
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0", optimize=False)
    return buf.getvalue(), "jpg"


def _eight_bit(im: Image.Image) -> np.ndarray:
    if im.mode in SIXTEEN_BIT:
        v = np.asarray(im).astype(np.float64)
        return np.clip(np.rint(v * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
    if im.mode == "F":
        v = np.asarray(im).astype(np.float64)
        v = np.nan_to_num(v, nan=0.0)
        scale = 255.0 if v.size and 0.0 <= v.min() and v.max() <= 1.0 else 1.0
        return np.clip(np.rint(v * scale), 0, 255).astype(np.uint8)
    if im.mode == "La":
        return np.asarray(im)[..., 0].copy()
    if im.mode == "LAB":
        from PIL import ImageCms

        to_srgb = ImageCms.buildTransform(ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB",
                                          "RGB")
        return np.asarray(ImageCms.applyTransform(im, to_srgb))
    try:
        return np.asarray(im.convert("RGB"))
    except (ValueError, OSError) as exc:
        raise ShardError(f"image mode {im.mode!r} cannot be converted to RGB: {exc}") from exc
