"""The student: a timm DeiT with a distillation token (two heads), its input transform, head outputs.

Train mode with ``set_distilled_training(True)`` returns ``(cls_logits, dist_logits)``; eval mode returns their
average (DeiT's inference rule). :func:`heads` gives both heads separately in eval mode (for per-head accuracy).

The final student (``<out_dir>/student.pt``) is a plain timm state dict (``student-ema.pt``: the EMA weights when
``train.ema=true``); :func:`load_student` loads it from a run's config. :func:`save_timm_folder` (``python -m
pipeline.export``) writes it in timm's own Hub format (``model.safetensors`` + ``config.json`` with the architecture,
its kwargs and the preprocessing), so that ``timm.create_model("local-dir:<folder>", pretrained=True)`` (or
``"hf-hub:<id>"`` after a push) rebuilds it with no kwargs retyped.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

from pipeline.errors import CheckpointError, ConfigError, MissingInput
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


def init_student(model: nn.Module, path) -> None:
    """Start ``model`` from a student state dict of another input size (DeiT's fine-tune at 384 from a 224 run):
    timm's own checkpoint filter resamples the position embedding (bicubic, as DeiT's main.py); every other
    tensor must match (train.init names a student of this architecture)."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    if not Path(path).is_file():
        raise MissingInput(f"train.init={path}: no such file (a run's student.pt)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(checkpoint_filter_fn(state, unwrap(model), adapt_layer_scale=True))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[1:2] or [str(exc)]
        raise CheckpointError(f"train.init={path}: not a state dict of this student: {first[0].strip()}") from exc


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



def export_config(student_cfg, num_classes: int, *, crop_pct: float, interpolation: str) -> tuple[dict, dict]:
    """(model_args, data_config) of an exported student: what ``timm.create_model`` needs beyond the name (size,
    patch, ``student.kwargs``), and the eval preprocessing the student was validated with (pipeline/replay:
    resize to size/crop_pct, centre crop, its own mean/std)."""
    args = model_kwargs(student_cfg, num_classes)
    size = int(student_cfg.img_size)
    data = {"input_size": (3, size, size), "mean": tuple(float(v) for v in student_cfg.mean),
            "std": tuple(float(v) for v in student_cfg.std), "crop_pct": float(crop_pct),
            "interpolation": str(interpolation), "crop_mode": "center"}
    return args, data


def _for_hf(model: nn.Module, data_config: dict) -> nn.Module:
    """Set the model's pretrained_cfg to the export's preprocessing: what every timm in our range writes to
    config.json (newer ones also take ``data_config``). The source tag/licence (e.g. ``fb_in1k``) are dropped:
    these weights are not timm's."""
    cfg = dict(model.pretrained_cfg)
    cfg.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()})
    cfg.update(num_classes=model.num_classes, tag=None, license=None)
    model.pretrained_cfg = cfg
    return model


def _hf_kwargs(fn, model_args: dict, data_config: dict, label_names) -> dict:
    kw = {"model_args": {k: v for k, v in model_args.items() if k != "num_classes"}, "safe_serialization": True,
          "model_config": {"label_names": list(label_names)} if label_names else None}
    if "data_config" in inspect.signature(fn).parameters:  # timm >= 1.0.29
        kw["data_config"] = data_config
    return kw


def save_timm_folder(model: nn.Module, out, model_args: dict, data_config: dict, label_names=None) -> None:
    """``model.safetensors`` + ``config.json`` into ``out`` with timm's own writer (``save_for_hf``)."""
    from timm.models import save_for_hf

    model = _for_hf(unwrap(model).eval(), data_config)
    save_for_hf(model, str(out), **_hf_kwargs(save_for_hf, model_args, data_config, label_names))
    # safetensors creates its file 0600 (safetensors issue 782); an export is for sharing, so its files get the
    # user's umask like any other new file.
    mask = os.umask(0)
    os.umask(mask)
    for f in Path(out).iterdir():
        os.chmod(f, 0o666 & ~mask)


def push_timm(model: nn.Module, repo_id: str, model_args: dict, data_config: dict, label_names=None) -> str:
    """Upload the same folder to the Hugging Face Hub with timm's ``push_to_hf_hub`` (needs a login)."""
    from timm.models import push_to_hf_hub

    model = _for_hf(unwrap(model).eval(), data_config)
    return str(push_to_hf_hub(model, repo_id, **_hf_kwargs(push_to_hf_hub, model_args, data_config, label_names)))
