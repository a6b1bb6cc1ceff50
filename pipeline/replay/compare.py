"""The two replay backends compared: a plan rendered by the per-sample path (what block_views returns) next
to render_plan's batched render, per view in uint8 levels or by a model's argmax (tests/test_batched.py,
bench/bench_batched.py, verification on a device).
"""

from __future__ import annotations

import torch

from pipeline.replay import pixels
from pipeline.replay.batched import merge_plans, render_plan
from pipeline.replay.batched_ops import apply_op
from pipeline.replay.mixing import mix_images
from pipeline.replay.view_params import AugmentConfig
from pipeline.replay.pixels import open_image


def render_reference(plans) -> torch.Tensor:
    """A plan through the per-sample path (pixels.render, mix_images): what block_views returns, on the CPU."""
    plan = merge_plans(plans)
    cfg = AugmentConfig(image_size=plan["size"], interpolation=plan["interpolation"], rand_augment=None)
    views = []
    for data, params, reduced in zip(plan["data"], plan["params"], plan["reduced_dct"]):
        image, scale = pixels.decode(open_image(data), params if reduced else None, cfg.image_size)
        views.append(pixels.apply(image, params, cfg, scale))
    out = [v if m is None else mix_images(v, views[j], m)
           for v, j, m in zip(views, plan["partner"], plan["mix"])]
    if not out:
        return torch.zeros(0, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    return torch.stack(out)


def compare_backends(plans, device="cpu", model=None, *, batch_size: int = 64) -> dict:
    """Both renders of the same plans, compared: per-view mean absolute difference in uint8 levels
    ("mean_abs", float [B]) and, with a model, the fraction of views whose argmax agrees ("agreement")."""
    plan = merge_plans(plans)
    device = torch.device(device)
    ref = render_reference(plan)
    new = render_plan(plan, device)
    out = {"mean_abs": (new.cpu().float() - ref.float()).abs().mean(dim=(1, 2, 3)), "agreement": None}
    if model is not None:
        a = _argmax(model, ref, device, batch_size)
        b = _argmax(model, new, device, batch_size)
        out["agreement"] = float((a == b).float().mean()) if len(a) else 1.0
    return out


def pixel_difference(plans, device="cpu") -> torch.Tensor:
    """Per view, the mean absolute difference (uint8 levels) between the batched and the per-sample render."""
    return compare_backends(plans, device)["mean_abs"]


def agreement(model, plans, device="cpu", *, batch_size: int = 64) -> float:
    """Fraction of views whose argmax under `model` is the same for both backends (per-sample on the CPU,
    batched on `device`).

    model: a callable on uint8 [B, 3, S, S] views on `device` returning logits (e.g. a TeacherRunner), or an
    nn.Module taking normalised input (normalised here with its timm pretrained_cfg mean/std)."""
    return compare_backends(plans, device, model, batch_size=batch_size)["agreement"]


def compare_op(name: str, images: torch.Tensor, args: list, device="cpu",
               interpolation: str = "bilinear") -> tuple[float, int]:
    """One RandAugment op, batched on `device` vs pixels.apply_op_image per sample on the CPU, on the same uint8
    inputs [n, 3, H, W] with one argument each: (mean, max) absolute difference in uint8 levels."""
    ref = torch.stack([pixels.apply_op_image(img, name, a, interpolation) for img, a in zip(images, args)])
    out = apply_op(images.to(device), name, list(args), interpolation).cpu()
    diff = (out.int() - ref.int()).abs()
    return float(diff.float().mean()), int(diff.max())


def _argmax(model, views: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    classify = _view_classifier(model, device)
    with torch.inference_mode():
        return torch.cat([classify(views[i:i + batch_size].to(device)).argmax(-1).cpu()
                          for i in range(0, len(views), batch_size)])


def _view_classifier(model, device):
    """uint8 views -> logits: modules get x/255 normalised with their timm mean/std (ImageNet's by default)."""
    if not isinstance(model, torch.nn.Module):
        return model
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), device=device).view(1, -1, 1, 1)
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), device=device).view(1, -1, 1, 1)
    model = model.to(device).eval()
    return lambda views: model(views.float().div_(255.0).sub_(mean).div_(std))
