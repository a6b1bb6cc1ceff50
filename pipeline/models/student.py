"""The student: a timm DeiT with a distillation token (two heads), its input transform, head outputs.

Train mode with ``set_distilled_training(True)`` returns ``(cls_logits, dist_logits)``; eval mode returns their
average (DeiT's inference rule). :func:`heads` gives both heads separately in eval mode (for per-head accuracy).

The final student (``<out_dir>/student.pt``) is a plain timm state dict; load it with::

    timm.create_model(name, num_classes=C, img_size=S, patch_size=P, checkpoint_path="student.pt")

(plus any ``student.kwargs`` the run used, e.g. ``depth=2``). ``student-ema.pt`` holds the EMA weights when
``train.ema=true``. :func:`load_student` does the same from a run's config.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.models.teacher import model_input


def model_kwargs(student_cfg, num_classes: int) -> dict:
    """Keyword arguments for ``timm.create_model`` (everything but the name and weights)."""
    kw = {"num_classes": int(num_classes), "img_size": int(student_cfg.img_size),
          "patch_size": int(student_cfg.patch_size)}
    extra = student_cfg.get("kwargs") or {}
    kw.update({str(k): v for k, v in dict(extra).items()})
    return kw


def create_student(student_cfg, num_classes: int, *, checkpoint_path: str | None = None) -> nn.Module:
    """timm ``student_cfg.name`` (a ``deit_*_distilled_*``) with timm's own init, drop-path, distilled training."""
    name = str(student_cfg.name)
    kw = model_kwargs(student_cfg, num_classes)
    model = timm.create_model(name, pretrained=False, drop_path_rate=float(student_cfg.drop_path),
                              checkpoint_path=checkpoint_path, **kw)
    if not hasattr(model, "set_distilled_training") or not hasattr(model, "head_dist"):
        raise ConfigError(f"student.name={name!r} is not a distilled DeiT (no distillation token/head); "
                         f"use a deit_*_distilled_* model")
    model.set_distilled_training(True)
    return model


def load_student(student_cfg, num_classes: int, path) -> nn.Module:
    """A trained student for inference (eval mode: the two heads averaged)."""
    return timm.create_model(str(student_cfg.name), checkpoint_path=str(path),
                             **model_kwargs(student_cfg, num_classes)).eval()


def normalise(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float], device,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW views -> float32 (x/255 - mean) / std on ``device`` (the student's own normalisation)."""
    return model_input(images_u8, mean, std, device=device, channels_last=channels_last)


def heads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-token head, distillation-token head) logits in eval mode; ``model(x)`` is their average."""
    feats = model.forward_features(x)
    return model.head(feats[:, 0]), model.head_dist(feats[:, 1])


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unwrapped model's state dict (no DDP/compile prefixes), copied to CPU (what timm's checkpoint_path
    loads)."""
    sd = unwrap(model).state_dict()
    for k, v in sd.items():
        sd[k] = v.detach().cpu().clone()
    return sd


def unwrap(model: nn.Module) -> nn.Module:
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner

