"""Batched replay: the views of views.block_views, rendered a whole batch at a time on any device.

Two halves, so that a DataLoader worker does only the cheap one:

    plan_block(items, ...)        CPU, in workers. Reads image headers only; draws params, partners and mixes,
                                  computes digests and targets exactly as block_views does, and draws the erasing
                                  noise. Returns a picklable plan (encoded bytes + numbers).
    render_plan(plans, device)    In the process that owns `device`. Decodes the batch (nvJPEG on CUDA) and applies
                                  the params as batched tensor ops -> uint8 [B, 3, S, S] on `device`.

Every op reproduces the arithmetic of the per-sample op it stands in for (pipeline.replay.pixels, i.e.
torchvision's uint8 semantics), including the rounding back to uint8 after every op, so that a batched view is
the per-sample view wherever the device allows (measured: tests/test_batched.py, bench/bench_batched.py):

    exact      crop+resize (torch's fixed-point uint8 kernel; off the CPU emulated by exact integer matmuls),
               flip, Translate, Posterize, Solarize, SolarizeAdd, Invert, Equalize, AutoContrast, Brightness,
               Contrast, Color, Sharpness (the fused multiply-add of torch's kernels is emulated in float64),
               erasing, mixup (uint8 rounding as mix_images), CutMix, ColorJitter
    CPU-exact  Rotate, ShearX/Y: torchvision's own matrix, grid and grid_sample (bilinear or bicubic), batched.
               Off the CPU the grid is computed in float64 (TF32-proof) and grid_sample is the device's: a level
               here and there.
    differs    JPEG decode of large crops: the per-sample path decodes at a reduced DCT scale when the crop allows
               (pixels.decode); nvJPEG has no DCT scaling, so this path always decodes at full size. On CUDA,
               nvJPEG's IDCT/chroma upsampling is not libjpeg-turbo's either.

The renderer's parts: pipeline.replay.batched_resize (crop + exact uint8 resize), pipeline.replay.batched_ops
(flip, ColorJitter, RandAugment, erasing, mixing as batched tensor ops). Partners, mix draws and targets come
from pipeline.replay.mixing, the very functions block_views uses. pipeline.replay.compare renders a plan through
the per-sample path (`render_reference`) and compares the two backends (`agreement`, `pixel_difference`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from pipeline.replay import pixels, seeding
from pipeline.replay.batched_ops import color_jitter, erase, flip, mix, rand_augment
from pipeline.replay.batched_resize import crop_resize
from pipeline.replay.digest import view_digest
from pipeline.replay.mixing import block_mixes, soft_target
from pipeline.replay.view_params import AugmentConfig, eval_params, sample_params
from pipeline.replay.pixels import erase_fill, open_image
from pipeline.replay.transfer import cuda_stream, to_device

try:  # deprecated in torchvision 0.29 (TorchCodec); pixels.decode has the same guard
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg
except ImportError:  # pragma: no cover
    decode_jpeg = decode_image = None

# Plan fields with one entry per sample, in sample order (merge_plans concatenates them).
PER_SAMPLE = ("index", "label", "data", "codec", "params", "mix", "digest", "noise", "reduced_dct")

# On the CPU, ops run over the whole batch only while its float32 copy stays cache-sized: 32 toy views
# (0.4 MB) render 1.25x faster batched than one by one, 32 views at 224 px (19 MB) 1.5x slower
# (bench/bench_batched.py: "batched" vs "batched, batch ops").
CPU_BATCH_BYTES = 4 * 2**20


# ================================================================================================= plan (workers)


def plan_block(items: list[tuple[int, bytes, int]], *, run_seed: int, seed_index: int, cfg: AugmentConfig,
               num_classes: int, train: bool = True) -> dict:
    """Everything about one block's views except pixels: the same draws, digests and targets as block_views.

    items: (global index, image bytes, label), consecutive indices. Only headers are read (lazy PIL open)."""
    imgs = [open_image(data) for _, data, _ in items]
    sizes = [(img.size[1], img.size[0]) for img in imgs]
    n = len(items)
    if train:
        params = [sample_params(seeding.view_rng(run_seed, seed_index, index), hw, cfg)
                  for (index, _, _), hw in zip(items, sizes)]
        partner, mixes = block_mixes(items, run_seed=run_seed, seed_index=seed_index, cfg=cfg)
    else:
        params = [eval_params(hw, cfg) for hw in sizes]
        partner, mixes = list(range(n)), [None] * n
    smoothing = cfg.label_smoothing if train else 0.0
    records, targets, digests = [], [], []
    for a, (index, _, label) in enumerate(items):
        b, pair = partner[a], mixes[a]
        record = None if pair is None else {"j": items[b][0], "pj": params[b], **pair}
        records.append(record)
        targets.append(soft_target(label, items[b][2], pair, num_classes, smoothing))
        digests.append(view_digest(index, params[a], record))
    return {
        "index": [int(i) for i, _, _ in items],
        "label": [int(lab) for _, _, lab in items],
        "data": [bytes(d) for _, d, _ in items],
        "codec": [codec(img) for img in imgs],
        "params": params,
        "mix": records,
        "partner": partner,
        "digest": digests,
        "target": torch.stack(targets) if targets else torch.zeros(0, num_classes),
        "noise": [erase_noise(p) for p in params],
        "reduced_dct": [bool(train)] * n,  # the per-sample path may draft-decode training views only
        "size": int(cfg.image_size),
        "interpolation": cfg.interpolation,
    }


def codec(img) -> str:
    """Which decoder reproduces pixels.decode's full-size pixels: 'jpeg' (batched decode_jpeg), 'png'
    (torchvision decode_image) or 'pil' (pixels.decode itself, e.g. CMYK JPEGs, palette PNGs, other formats)."""
    if img.mode in ("RGB", "L"):
        if img.format == "JPEG":
            return "jpeg"
        if img.format == "PNG":
            return "png"
    return "pil"


def erase_noise(params: dict) -> torch.Tensor | None:
    """The erased box's noise, drawn here so the renderer draws nothing (the same generator as pixels._erase)."""
    if params["erase"] is None:
        return None
    _, _, h, w, seed = params["erase"]
    return erase_fill(seed, (3, h, w))


def merge_plans(plans) -> dict:
    """One plan from several (partners re-indexed to the merged positions); a single plan is returned as is."""
    if isinstance(plans, dict):
        return plans
    plans = list(plans)
    if not plans:
        raise ValueError("merge_plans: no plans")
    first = plans[0]
    for p in plans[1:]:
        if (p["size"], p["interpolation"]) != (first["size"], first["interpolation"]):
            raise ValueError(f"merge_plans: view size/interpolation differ: {(p['size'], p['interpolation'])} vs "
                             f"{(first['size'], first['interpolation'])}")
    merged = {key: [v for p in plans for v in p[key]] for key in PER_SAMPLE}
    offsets = np.cumsum([0] + [len(p["index"]) for p in plans])
    merged["partner"] = [int(off + j) for p, off in zip(plans, offsets) for j in p["partner"]]
    merged["target"] = torch.cat([p["target"] for p in plans])
    merged["size"], merged["interpolation"] = first["size"], first["interpolation"]
    return merged


# ================================================================================================= render (device)


def render_plan(plans, device="cpu", *, resize: str = "auto", group: str = "auto") -> torch.Tensor:
    """Pixels of a plan (or of several, merged): uint8 [B, 3, S, S] on `device`.

    resize: 'native' (torchvision's resized_crop per sample: on CPU the very kernel of the per-sample path),
    'exact' (the same fixed-point arithmetic as batched integer matmuls in float64), or 'auto' (native on CPU,
    exact elsewhere, where torchvision would resize uint8 in float and round differently).
    group: 'batch' (one call per op over all the samples that run it), 'sample' (the same functions on one
    sample at a time, through views), or 'auto' (batch, except on the CPU for batches above CPU_BATCH_BYTES,
    where whole-batch temporaries fall out of the caches and cost more than the calls they save).
    Every combination gives the same pixels on a given device."""
    plan = merge_plans(plans)
    device = torch.device(device)
    if not plan["index"]:
        return torch.zeros(0, 3, plan["size"], plan["size"], dtype=torch.uint8, device=device)
    if group not in ("auto", "batch", "sample"):
        raise ValueError(f"group must be 'batch', 'sample' or 'auto', got {group!r}")
    params = plan["params"]
    cpu = device.type == "cpu"
    method = ("native" if cpu else "exact") if resize == "auto" else resize
    images = decode_batch(plan["data"], plan["codec"], device)
    x = crop_resize(images, [p["crop"] for p in params], plan["size"], plan["interpolation"], method)
    batch = group == "batch" or (group == "auto" and (not cpu or 4 * x.numel() <= CPU_BATCH_BYTES))
    x = flip(x, [p["flip"] for p in params], batch)
    x = color_jitter(x, [p.get("jitter") for p in params], batch)
    x = rand_augment(x, [p.get("ra", ()) for p in params], plan["interpolation"], batch)
    x = erase(x, [p["erase"] for p in params], plan["noise"], batch)
    return mix(x, plan["partner"], plan["mix"], batch)


# ------------------------------------------------------------------------------------------------- decode


def _decode_jpegs(encoded: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    if device.type != "cuda":
        return decode_jpeg(encoded, device=device, mode=ImageReadMode.RGB)
    # torchvision's nvJPEG decoder allocates its outputs on the caller's current stream but writes them from a
    # private stream that does not wait for the caller's (pytorch/vision#9606; 199/200 corrupted there on an
    # H100): the caching allocator hands it blocks just freed on the caller's stream that kernels queued there
    # have still to read -- here, the previous render's intermediates -- and nvJPEG overwrites them. So decode
    # with a stream current that runs no kernels of its own (its blocks are only ever these outputs), and
    # record_stream keeps each output from being handed out again before the caller's stream is done with it.
    caller, decoding = torch.cuda.current_stream(device), cuda_stream(device, "decode")
    with torch.cuda.stream(decoding):
        images = decode_jpeg(encoded, device=device, mode=ImageReadMode.RGB)
    caller.wait_stream(decoding)  # torchvision waits for the decode today; this keeps the order if it stops
    for image in images:
        image.record_stream(caller)
    return images


def decode_batch(data: list[bytes], codecs: list[str], device: torch.device) -> list[torch.Tensor]:
    """Full-size uint8 CHW RGB images on `device`: all JPEGs in one decode_jpeg call (nvJPEG batch on CUDA)."""
    out: list[torch.Tensor | None] = [None] * len(data)
    with warnings.catch_warnings():  # torchvision 0.29 warns on every decode call (TorchCodec migration)
        warnings.simplefilter("ignore", DeprecationWarning)
        jpeg = [i for i, c in enumerate(codecs) if c == "jpeg"]
        if jpeg:
            decoded = _decode_jpegs([_bytes_tensor(data[i]) for i in jpeg], device)
            for i, img in zip(jpeg, decoded):
                out[i] = img
        for i, c in enumerate(codecs):
            if c == "png":
                out[i] = to_device(decode_image(_bytes_tensor(data[i]), mode=ImageReadMode.RGB), device)
            elif c == "pil":
                out[i] = to_device(pixels.decode(open_image(data[i]))[0], device)
    return out


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
