"""Crop + antialiased resize of a batch of images to uint8 [B, 3, S, S], for render_plan.

'native' is torchvision's resized_crop per sample (on the CPU, the very kernel of the per-sample path); 'exact'
reproduces torch's CPU uint8 kernel bit for bit as batched float64 matmuls of its int16 fixed-point weights, so
that every device resizes as the per-sample path does on the CPU.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as F

from pipeline.replay import pixels
from pipeline.replay.transfer import to_device

# Working-set cap for one chunk of the exact resize (float64 crops on the device).
RESIZE_CHUNK_BYTES = 256 * 2**20


def crop_resize(images: list[torch.Tensor], crops: list, size: int, interpolation: str,
                method: str) -> torch.Tensor:
    """Each image's crop box, antialiased-resized to size x size: uint8 [B, 3, S, S]."""
    if method == "native":
        return resize_native(images, crops, size, interpolation)
    if method == "exact":
        return resize_exact(images, crops, size, interpolation)
    raise ValueError(f"resize method must be 'native', 'exact' or 'auto', got {method!r}")


def resize_native(images, crops, size: int, interpolation: str) -> torch.Tensor:
    """torchvision's resized_crop per sample (sizes differ per sample, so there is no batched call)."""
    interp = pixels.interpolation_mode(interpolation)
    return torch.stack([F.resized_crop(img, *crop, [size, size], interpolation=interp, antialias=True)
                        for img, crop in zip(images, crops)])


def resize_exact(images, crops, size: int, interpolation: str) -> torch.Tensor:
    """torch's CPU uint8 antialiased resize, bit for bit, as batched matmuls: int16 fixed-point weights,
    horizontal pass rounded to uint8, then the vertical pass. The products and sums are integers below 2**53,
    so float64 matmuls compute them exactly on any device and in any summation order.

    Crops are sorted by size and cut into chunks (bounded memory, little padding); each chunk is one zero-padded
    float64 canvas and two batched matmuls."""
    if interpolation not in _FILTERS:
        return resize_native(images, crops, size, interpolation)
    device = images[0].device
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    for chunk in _resize_chunks(crops):
        hp = max(crops[i][2] for i in chunk)
        wp = max(crops[i][3] for i in chunk)
        canvas = torch.zeros(len(chunk), 3, hp, wp, dtype=torch.float64, device=device)
        for k, i in enumerate(chunk):
            _paste_crop(canvas[k], images[i], crops[i])
        wx, px = _dense_weights([crops[i][3] for i in chunk], wp, size, interpolation, device)
        wy, py = _dense_weights([crops[i][2] for i in chunk], hp, size, interpolation, device)
        n = len(chunk)
        rows = _fixed_point_round(canvas.view(n, 3 * hp, wp).bmm(wx.transpose(1, 2)), px)  # [n, 3*hp, S]
        rows = rows.view(n, 3, hp, size).permute(0, 2, 1, 3).reshape(n, hp, 3 * size)
        cols = _fixed_point_round(wy.bmm(rows), py)                                         # [n, S, 3*S]
        out[to_device(chunk, device)] = cols.view(n, size, 3, size).permute(0, 2, 1, 3).to(torch.uint8)
    return out


def _resize_chunks(crops) -> list[list[int]]:
    """Sample positions sorted by crop area, cut where the padded float64 canvas would pass RESIZE_CHUNK_BYTES."""
    order = sorted(range(len(crops)), key=lambda i: (crops[i][2] * crops[i][3], i))
    chunks, cur, hp, wp = [], [], 0, 0
    for i in order:
        h, w = max(hp, crops[i][2]), max(wp, crops[i][3])
        if cur and (len(cur) + 1) * 3 * h * w * 8 > RESIZE_CHUNK_BYTES:
            chunks.append(cur)
            cur, h, w = [], crops[i][2], crops[i][3]
        cur.append(i)
        hp, wp = h, w
    chunks.append(cur)
    return chunks


def _paste_crop(dst: torch.Tensor, image: torch.Tensor, crop) -> None:
    """The crop box of `image` into the top-left of `dst`; outside the image stays 0 (torchvision pads with 0)."""
    top, left, h, w = crop
    H, W = image.shape[-2:]
    y0, y1, x0, x1 = max(top, 0), min(top + h, H), max(left, 0), min(left + w, W)
    if y1 > y0 and x1 > x0:
        dst[:, y0 - top:y1 - top, x0 - left:x1 - left] = image[:, y0:y1, x0:x1]


def _fixed_point_round(acc: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(acc + 2**(p-1)) >> p, clamped to uint8 range, per sample (the kernel's int32 shift and saturating pack)."""
    p = precision.view(-1, 1, 1)
    return acc.add_(torch.exp2(p - 1)).mul_(torch.exp2(-p)).floor_().clamp_(0, 255)


def _dense_weights(in_sizes: list[int], padded: int, out_size: int, interpolation: str, device):
    """Per-sample [out, padded] float64 matrices of the int16 weights (zero past each input size), and the
    per-sample precision. Built on the device from the compact (first tap, K weights) form."""
    compact = [_int16_weights(n, out_size, interpolation) for n in in_sizes]
    k = max(w.shape[1] for _, w, _ in compact)
    first = to_device(np.stack([x for x, _, _ in compact]), device)
    weights = to_device(np.stack([np.pad(w, ((0, 0), (0, k - w.shape[1]))) for _, w, _ in compact]), device,
                        torch.float64)
    taps = (first[:, :, None] + torch.arange(k, device=device)).clamp_(max=padded - 1)
    # Taps past an input's end carry weight 0; scatter_add (not scatter) keeps a clamped duplicate from
    # overwriting a real weight.
    dense = torch.zeros(len(in_sizes), out_size, padded, dtype=torch.float64, device=device)
    dense.scatter_add_(2, taps, weights)
    precision = to_device([p for _, _, p in compact], device, torch.float64)
    return dense, precision


def _linear_filter(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def _cubic_filter(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5, in torch's operation order (HelperInterpCubic::aa_filter)."""
    a = -0.5
    x = np.abs(x)
    inner = ((a + 2) * x - (a + 3)) * x * x + 1
    outer = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1.0, inner, np.where(x < 2.0, outer, 0.0))


_FILTERS = {"bilinear": (_linear_filter, 2), "bicubic": (_cubic_filter, 4)}


@functools.lru_cache(maxsize=8192)
def _int16_weights(in_size: int, out_size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's antialiased weights for one axis (HelperInterpBase::_compute_indices_weights_aa in double,
    then _compute_indices_int16_weights_aa): first tap [out], int16 weights [out, K], precision bits."""
    filt, interp_size = _FILTERS[interpolation]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    k = int(math.ceil(support)) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xsize = np.clip(np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin, 0, k)
    j = np.arange(k)
    w = np.where(j[None] < xsize[:, None], filt((j[None] + xmin[:, None] - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for t in range(k):  # sequential, like the C++ loop (numpy's pairwise sum could round differently)
        total += w[:, t]
    w = np.divide(w, total[:, None], out=w, where=total[:, None] != 0)
    w_max = w.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    ints = np.trunc(np.where(v < 0, v - 0.5, v + 0.5)).astype(np.int64)
    return xmin, ints, precision
