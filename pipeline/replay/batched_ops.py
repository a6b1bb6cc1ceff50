"""The batched view ops of render_plan: uint8 [n, 3, S, S] in and out, one argument per sample.

Each reproduces the arithmetic of the per-sample op it stands in for (pipeline.replay.pixels, torchvision's
uint8 semantics), the rounding back to uint8 included. The `batch` flag of the block-level ops (flip,
color_jitter, rand_augment, erase, mix) picks one call over all the samples that run an op, or the same
function on one sample at a time through views; both give the same pixels.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torchvision.transforms.v2.functional as F
from torchvision.transforms.functional import _get_inverse_affine_matrix

from pipeline.replay.pixels import FILL
from pipeline.replay.transfer import to_device


# ------------------------------------------------------------------------------------------------- flip, colour


def _apply_rows(x: torch.Tensor, rows: list[int], args: list, fn, batch: bool) -> torch.Tensor:
    """x[rows] = fn(x[rows], args): in one call (batch), or row by row through views (no gather copies)."""
    if not rows:
        return x
    if batch:
        idx = _positions(rows, x.device)
        x[idx] = fn(x[idx], list(args))
    else:
        for i, arg in zip(rows, args):
            x[i:i + 1] = fn(x[i:i + 1], [arg])
    return x


def _positions(rows: list[int], device) -> torch.Tensor:
    return to_device(rows, device, torch.long)


def flip(x: torch.Tensor, flags: list[bool], batch: bool = True) -> torch.Tensor:
    rows = [i for i, f in enumerate(flags) if f]
    return _apply_rows(x, rows, [None] * len(rows), lambda img, _: img.flip(-1), batch)


def color_jitter(x: torch.Tensor, jitters: list, batch: bool = True) -> torch.Tensor:
    """ColorJitter params ([[b, c, s], order]): position k of every sample's order, grouped by op."""
    ops = (brightness, contrast, saturation)
    for k in range(3):
        groups = defaultdict(list)
        for i, jit in enumerate(jitters):
            if jit is not None:
                factors, order = jit
                groups[order[k]].append((i, factors[order[k]]))
        for op, members in groups.items():
            x = _apply_rows(x, [i for i, _ in members], [a for _, a in members], ops[op], batch)
    return x


def _per_sample(values, dtype, device) -> torch.Tensor:
    """Per-sample scalars as an [n, 1, 1, 1] tensor (float32 values are rounded from Python floats exactly as
    torch rounds a Python scalar operand)."""
    return to_device(values, device, dtype).view(-1, 1, 1, 1)


def _scalar(value: float, device) -> torch.Tensor:
    """A float32 divisor as a device tensor: a true division everywhere (CUDA divides by a Python scalar as a
    multiplication by its reciprocal, which can differ from the CPU's division in the last bit)."""
    return to_device(value, device, torch.float32)


def _fma32(acc: torch.Tensor, other: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """float32(acc + alpha * other) with a single rounding: torch's add_(other, alpha=) is a fused multiply-add
    (vec::fmadd on CPU, contracted by nvcc on CUDA). The float64 product of two float32 is exact."""
    return acc.double().addcmul_(other, alpha).float()


def _blend(img: torch.Tensor, other: torch.Tensor, ratio: list[float]) -> torch.Tensor:
    """torchvision's _blend on uint8: img*ratio + other*(1-ratio), clamped, truncated to uint8."""
    r = _per_sample([float(v) for v in ratio], torch.float32, img.device)
    alpha = _per_sample([1.0 - float(v) for v in ratio], torch.float32, img.device)
    return _fma32(img.float().mul_(r), other, alpha).clamp_(0, 255).to(torch.uint8)


def _gray(img: torch.Tensor) -> torch.Tensor:
    """torchvision's float grayscale (0.2989 r + 0.587 g + 0.114 b, fused adds), floored as for uint8: [n,1,H,W]."""
    r, g, b = img.unbind(1)
    one = torch.ones((), dtype=torch.float32, device=img.device)
    lum = _fma32(_fma32(r.mul(0.2989), g.float(), one * 0.587), b.float(), one * 0.114)
    return lum.floor_().unsqueeze(1)


def brightness(img: torch.Tensor, factors: list[float]) -> torch.Tensor:
    f = _per_sample([float(v) for v in factors], torch.float32, img.device)
    return img.float().mul_(f).clamp_(0, 255).to(torch.uint8)


def contrast(img: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """Blend with the mean of the floored grayscale, computed as torch's CPU mean does: float32 sum, then a
    true division (CUDA's mean, and CUDA's division by a Python scalar, multiply by 1/N instead). A sum of
    integers below 2**24 (views up to 256 px) is exact in any order, so every device gets the CPU's mean."""
    gray = _gray(img)
    mean = gray.sum(dim=(1, 2, 3), keepdim=True).div_(_scalar(gray[0].numel(), img.device))
    return _blend(img, mean, factors)


def saturation(img: torch.Tensor, factors: list[float]) -> torch.Tensor:
    return _blend(img, _gray(img), factors)


def sharpness(img: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """pixels._sharpness batched: exact integer 3x3 blur / 13, rounded, blended into the interior only."""
    if img.shape[-1] <= 2 or img.shape[-2] <= 2:
        return img
    out = img.float()
    r = out[..., :-2] + out[..., 1:-1]
    r += out[..., 2:]
    s = r[..., :-2, :] + r[..., 1:-1, :]
    s += r[..., 2:, :]
    view = out[..., 1:-1, 1:-1]
    blurred = s.add_(view, alpha=4.0).div_(_scalar(13.0, img.device)).round_()
    alpha = _per_sample([1.0 - float(v) for v in factors], torch.float32, img.device)
    view.copy_(_fma32(view, blurred.sub_(view), alpha))
    return out.clamp_(0, 255).to(torch.uint8)


def posterize(img: torch.Tensor, bits: list[int]) -> torch.Tensor:
    masks = [0xFF if b >= 8 else ((1 << b) - 1) << (8 - b) for b in bits]
    return img & _per_sample(masks, torch.uint8, img.device)


def solarize(img: torch.Tensor, thresholds: list[int]) -> torch.Tensor:
    """Thresholds above 255 leave the image as is (pixels._apply_op skips F.solarize there)."""
    thr = _per_sample([int(t) for t in thresholds], torch.int16, img.device)
    return torch.where(img >= thr, img.bitwise_not(), img)


def solarize_add(img: torch.Tensor, adds: list[int]) -> torch.Tensor:
    add = _per_sample([int(a) for a in adds], torch.int16, img.device)
    return torch.where(img < 128, (img.to(torch.int16) + add).clamp_(max=255).to(torch.uint8), img)


def _no_arg(fn):
    """Batch-ready torchvision ops (per image and channel already): the args are all None."""
    return lambda img, _args: fn(img)


# ------------------------------------------------------------------------------------------------- geometry


def translate(img: torch.Tensor, offsets: list[int], dim: int) -> torch.Tensor:
    """pixels._translate batched: out[..., k] = img[..., k - d] along `dim`, FILL where that is outside.
    One slice copy per sample: whole-pixel shifts need no arithmetic, and slices beat a per-pixel gather."""
    size = img.shape[dim]
    fill = to_device(FILL, img.device, img.dtype).view(1, -1, 1, 1)
    out = fill.expand_as(img).clone()
    for k, d in enumerate(int(o) for o in offsets):
        if abs(d) < size:
            out[k].narrow(dim - 1, max(d, 0), size - abs(d)).copy_(img[k].narrow(dim - 1, max(-d, 0), size - abs(d)))
    return out


def rotate(img: torch.Tensor, angles: list[float], interpolation: str = "bilinear") -> torch.Tensor:
    """pixels._rotate per sample (F.rotate about the centre, fill=FILL): torchvision's inverse matrix, grid and
    fill blend, batched. An angle of 0 (mod 360) is torchvision's copy fast path."""
    out = img.clone()
    turn = [i for i, a in enumerate(angles) if float(a) % 360 != 0]
    if turn:
        mats = [_get_inverse_affine_matrix([0.0, 0.0], -(float(angles[i]) % 360), [0.0, 0.0], 1.0, [0.0, 0.0])
                for i in turn]
        idx = _positions(turn, img.device)
        out[idx] = affine(img[idx], mats, interpolation)
    return out


def shear(img: torch.Tensor, factors: list[float], axis: int, interpolation: str = "bilinear") -> torch.Tensor:
    """pixels._shear per sample: F.affine(shear=[atan(f) in degrees] on x (axis 0) or y (axis 1), fill=FILL)."""
    mats = []
    for f in factors:
        sh = [0.0, 0.0]
        sh[axis] = math.degrees(math.atan(f))
        mats.append(_get_inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, 0.0], 1.0, sh))
    return affine(img, mats, interpolation)


def affine(img: torch.Tensor, matrices: list[list[float]], interpolation: str) -> torch.Tensor:
    """torchvision's _affine_grid + _apply_grid_transform (FILL) with one matrix per sample, through
    grid_sample's bilinear or bicubic; clamped before rounding (bicubic overshoots; bilinear stays in range)."""
    n, c, h, w = img.shape
    theta = to_device(matrices, img.device, torch.float32).view(n, 2, 3)
    grid = _affine_grid(theta, w, h)
    x = torch.cat((img.float(), torch.ones(n, 1, h, w, device=img.device)), dim=1)
    x = torch.nn.functional.grid_sample(x, grid, mode=interpolation, padding_mode="zeros", align_corners=False)
    x, mask = torch.tensor_split(x, indices=(-1,), dim=-3)
    fill = to_device(FILL, img.device, torch.float32).view(1, -1, 1, 1)
    return x.sub_(fill).mul_(mask.expand_as(x)).add_(fill).clamp_(0, 255).round_().to(torch.uint8)


def _affine_grid(theta: torch.Tensor, w: int, h: int) -> torch.Tensor:
    """torchvision's _affine_grid (output size = input size) for a batch of matrices. Off the CPU the matmul
    runs in float64 and is rounded once to float32: an accurate grid however the process set TF32 (which would
    cut the coordinates to 10 mantissa bits), where the CPU reference uses float32 sgemm."""
    n = theta.shape[0]
    if theta.device.type != "cpu":
        return _affine_grid(theta.double(), w, h).float()
    base = torch.empty(1, h, w, 3, dtype=theta.dtype, device=theta.device)
    base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=theta.device))
    base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=theta.device).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2).div_(to_device([0.5 * w, 0.5 * h], theta.device, theta.dtype))
    return base.view(1, h * w, 3).expand(n, -1, -1).bmm(rescaled).view(n, h, w, 2)


# ------------------------------------------------------------------------------------------------- RandAugment


def _any_interp(fn):
    """Ops that resample nothing ignore augment.interpolation."""
    return lambda img, args, _interpolation: fn(img, args)


# name -> fn(img, args, interpolation)
OPS = {
    "AutoContrast": _any_interp(_no_arg(F.autocontrast)),
    "Equalize": _any_interp(_no_arg(F.equalize)),
    "Invert": _any_interp(_no_arg(F.invert)),
    "Rotate": rotate,
    "ShearX": lambda img, args, interpolation: shear(img, args, 0, interpolation),
    "ShearY": lambda img, args, interpolation: shear(img, args, 1, interpolation),
    "TranslateXRel": _any_interp(lambda img, args: translate(img, args, 3)),  # whole pixels: a copy either way
    "TranslateYRel": _any_interp(lambda img, args: translate(img, args, 2)),
    "PosterizeIncreasing": _any_interp(posterize),
    "SolarizeIncreasing": _any_interp(solarize),
    "SolarizeAdd": _any_interp(solarize_add),
    "ColorIncreasing": _any_interp(saturation),
    "ContrastIncreasing": _any_interp(contrast),
    "BrightnessIncreasing": _any_interp(brightness),
    "SharpnessIncreasing": _any_interp(sharpness),
}


def apply_op(img: torch.Tensor, name: str, args: list, interpolation: str = "bilinear") -> torch.Tensor:
    """One RandAugment op on a batch, one argument per sample (pixels._apply_op's semantics)."""
    try:
        fn = OPS[name]
    except KeyError:
        raise ValueError(f"unknown RandAugment op {name!r}") from None
    return fn(img, list(args), interpolation)


def rand_augment(x: torch.Tensor, ops: list, interpolation: str, batch: bool = True) -> torch.Tensor:
    """Layer by layer (ops only depend on their own sample, so samples at the same layer run together),
    grouped by op name within a layer."""
    for layer in range(max((len(o) for o in ops), default=0)):
        groups = defaultdict(list)
        for i, sample_ops in enumerate(ops):
            if layer < len(sample_ops):
                name, arg = sample_ops[layer]
                groups[name].append((i, arg))
        for name, members in groups.items():
            x = _apply_rows(x, [i for i, _ in members], [a for _, a in members],
                            lambda img, args, name=name: apply_op(img, name, args, interpolation), batch)
    return x


# ------------------------------------------------------------------------------------------------- erase, mix


def erase(x: torch.Tensor, boxes: list, noise: list, batch: bool = True) -> torch.Tensor:
    rows = [i for i, b in enumerate(boxes) if b is not None]
    return _apply_rows(x, rows, [(boxes[i], noise[i]) for i in rows], _paste_noise, batch)


def _paste_noise(img: torch.Tensor, boxes_noise: list) -> torch.Tensor:
    """Each erased box's precomputed noise: assembled on the CPU into one canvas, moved once, selected by a mask."""
    n, _, size, _ = img.shape
    canvas = torch.zeros(n, 3, size, size, dtype=torch.uint8)
    inside = torch.zeros(n, 1, size, size, dtype=torch.bool)
    for k, ((t, l, h, w, _), noise) in enumerate(boxes_noise):
        canvas[k, :, t:t + h, l:l + w] = noise
        inside[k, :, t:t + h, l:l + w] = True
    return torch.where(to_device(inside, img.device), to_device(canvas, img.device), img)


def mix(x: torch.Tensor, partner: list[int], mixes: list, batch: bool = True) -> torch.Tensor:
    """Mixup / CutMix with the partners' unmixed views (mix_images, batched). The partner rows are read from
    the unmixed `x` while the mixed rows are written to a copy."""
    out = x.clone()
    for mode, fn in (("mixup", _mixup), ("cutmix", _cutmix)):
        rows = [i for i, m in enumerate(mixes) if m is not None and m["mode"] == mode]
        if not rows:
            continue
        if batch:
            out[_positions(rows, x.device)] = fn(x[_positions(rows, x.device)],
                                                 x[_positions([partner[i] for i in rows], x.device)],
                                                 [mixes[i] for i in rows])
        else:
            for i in rows:
                out[i:i + 1] = fn(x[i:i + 1], x[partner[i]:partner[i] + 1], [mixes[i]])
    return out


def _mixup(a: torch.Tensor, b: torch.Tensor, mixes: list) -> torch.Tensor:
    """round(a*lam + b*(1-lam)) in float32, as mix_images (two rounded products, one rounded sum)."""
    lam = _per_sample([m["lam"] for m in mixes], torch.float32, a.device)
    rest = _per_sample([1.0 - m["lam"] for m in mixes], torch.float32, a.device)
    out = a.float().mul_(lam).add_(b.float().mul_(rest))
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _cutmix(a: torch.Tensor, b: torch.Tensor, mixes: list) -> torch.Tensor:
    return torch.where(_box_masks([m["box"] for m in mixes], a.shape[-1], a.device), b, a)


def _box_masks(boxes: list, size: int, device) -> torch.Tensor:
    """[n, 1, S, S] True inside each [top, left, h, w] box."""
    b = to_device(boxes, device).view(-1, 4, 1)
    ar = torch.arange(size, device=device).view(1, size)
    rows = (ar >= b[:, 0]) & (ar < b[:, 0] + b[:, 2])
    cols = (ar >= b[:, 1]) & (ar < b[:, 1] + b[:, 3])
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
