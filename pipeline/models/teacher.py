"""The teacher: a timm model (RegNetY), its checkpoint, its input transform and a small inference wrapper.

Views are uint8 NCHW at the view size; each model applies its own resize and normalisation at the very end
(`model_input`), so the teacher and the student may differ there (docs/design.md, section 3).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pipeline.errors import TeacherError
from pipeline.models.weights import load_weights

log = logging.getLogger("pipeline")

# ------------------------------------------------------------------------------------------ building


def create_teacher(teacher_cfg, num_classes: int, *, load: bool = True) -> nn.Module:
    """timm model `teacher_cfg.name` with `num_classes` outputs, in eval mode.

    With `teacher_cfg.checkpoint` set and `load`, the checkpoint's weights are loaded strictly (a plain timm
    state dict, or {"model": state_dict, ...}, or .safetensors); hub weights are then not fetched, since they would
    be replaced. `name` is any timm model name, also `hf-hub:<id>` or `local-dir:<folder>` (with pretrained).
    With `load` and neither weights source, the random init is seeded (teacher.train.init_seed), so that an
    untrained teacher is the same model in every process (resume, verify_cache, online = cache).
    `teacher_cfg.kwargs` are extra timm.create_model kwargs (e.g. a RegNet's `w0`, `depth`, `output_stride`).
    """
    name = str(teacher_cfg.name)
    checkpoint = teacher_cfg.get("checkpoint") if load else None
    pretrained = bool(teacher_cfg.get("pretrained", False)) and not checkpoint
    seed = int(_get(teacher_cfg, "train", "init_seed") or 0) if load and random_weights(teacher_cfg) else None
    try:
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=pretrained, num_classes=int(num_classes),
                                      **teacher_kwargs(teacher_cfg))
    except (RuntimeError, ValueError, FileNotFoundError, TypeError) as exc:  # unknown name, source, folder or kwarg
        raise TeacherError(f"teacher.name={name!r}: {exc}") from exc
    if checkpoint:
        load_checkpoint(model, checkpoint, name=name, num_classes=int(num_classes))
    elif pretrained and load:
        _check_pretrained(model, teacher_cfg, int(num_classes))
    return model.eval()


def random_weights(teacher_cfg) -> bool:
    """Whether this teacher runs on its (seeded) random init: neither a checkpoint nor pretrained weights."""
    return not teacher_cfg.get("checkpoint") and not bool(teacher_cfg.get("pretrained", False))


def warn_if_random(teacher_cfg, data_source: str) -> bool:
    """One warning when a random-weights teacher labels real data (the toy source is where that is intended:
    tests and mechanics); returns whether it warned."""
    if not random_weights(teacher_cfg) or str(data_source) == "toy":
        return False
    log.warning(f"warning: teacher {teacher_cfg.name} has random weights (teacher.checkpoint=null, "
                f"teacher.pretrained=false) on data.source={data_source}: its targets are noise; set "
                f"teacher.checkpoint=<trained weights> (python -m pipeline.train_teacher) or teacher.pretrained=true")
    return True


def teacher_kwargs(teacher_cfg) -> dict:
    """The extra timm.create_model kwargs of this teacher: ``teacher.kwargs``, unless ``teacher.kwargs_for`` names
    another model (``teacher.name=<any timm model>`` on the toy config must not inherit the toy RegNetY's widths)."""
    kwargs, target = teacher_cfg.get("kwargs") or {}, teacher_cfg.get("kwargs_for")
    if target is not None and str(target) != str(teacher_cfg.name):
        return {}
    return OmegaConf.to_container(kwargs) if isinstance(kwargs, DictConfig) else dict(kwargs)  # plain: for JSON


def _get(cfg, *keys):
    for k in keys:
        cfg = cfg.get(k) if cfg is not None and hasattr(cfg, "get") else None
    return cfg


def _check_pretrained(model: nn.Module, teacher_cfg, num_classes: int) -> None:
    """Hub/local weights as a teacher: their classifier must be the data's classes (timm silently replaces a head
    of another size with a random one: its targets would be noise); a normalisation other than the weights' own
    is allowed but warned about."""
    name, cfg = str(teacher_cfg.name), getattr(model, "pretrained_cfg", None) or {}
    theirs = cfg.get("num_classes")
    if theirs and int(theirs) != num_classes:
        raise TeacherError(f"teacher.name={name!r}: its pretrained weights have {theirs} classes, the data "
                           f"{num_classes} (data.num_classes); timm would give it a new random classifier. Label data "
                           f"in the weights' own classes (e.g. ImageNet-1k class folders, sorted synsets), or fine-tune "
                           f"it (python -m pipeline.train_teacher teacher.pretrained=true) and set teacher.checkpoint")
    for key in ("mean", "std"):
        want, have = cfg.get(key), teacher_cfg.get(key)
        if want and have and [round(float(v), 4) for v in want] != [round(float(v), 4) for v in have]:
            log.warning(f"warning: teacher.{key}={list(have)} differs from the {key} its weights were trained with "
                        f"({list(want)}); set teacher.{key}={[float(v) for v in want]} unless that is intended")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (plain, or under "model"/"state_dict"; DDP/compile prefixes dropped)."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher checkpoint {path} not found (train one with `python -m pipeline.train_teacher`, "
                           f"or set teacher.checkpoint=null teacher.pretrained=true for hub weights)")
    if path.suffix != ".safetensors":
        obj = load_weights(path, TeacherError, "teacher checkpoint")
    else:  # e.g. a Hub download, an exported folder's weights: through timm's own reader
        try:
            obj = timm.models.load_state_dict(str(path))
        except Exception as exc:  # noqa: BLE001 - a corrupt file
            raise TeacherError(f"teacher checkpoint {path}: cannot be read: {type(exc).__name__}: "
                               f"{(str(exc).strip().splitlines() or [''])[0]}") from exc
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TeacherError(f"teacher checkpoint {path}: not a state dict (expected a timm state dict or "
                           f"{{'model': state_dict}})")
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def classifier_key(model: nn.Module) -> str | None:
    """State-dict key of the classifier weight (timm's pretrained_cfg names the head module)."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(head, (list, tuple)):
        head = head[0] if head else None
    return f"{head}.weight" if head else None


def load_checkpoint(model: nn.Module, path: str | os.PathLike, *, name: str, num_classes: int) -> None:
    """Load `path` into `model` strictly; any mismatch is a TeacherError naming the checkpoint, the model and the
    first mismatching key (and both class counts when the classifier's output size differs)."""
    sd = read_state_dict(path)
    want = model.state_dict()
    problems = []
    for k, v in want.items():
        if k not in sd:
            problems.append(f"key {k!r} {list(v.shape)} missing from the checkpoint")
        elif tuple(sd[k].shape) != tuple(v.shape):
            problems.append(f"key {k!r}: checkpoint {list(sd[k].shape)} vs model {list(v.shape)}")
    problems += [f"unexpected key {k!r} {list(sd[k].shape)} in the checkpoint" for k in sd if k not in want]
    head = classifier_key(model)
    classes = ""
    if head and head in sd and head in want and sd[head].ndim >= 1 and sd[head].shape[0] != want[head].shape[0]:
        classes = (f"; the checkpoint has {sd[head].shape[0]} classes, the model {num_classes} "
                   f"(data.num_classes)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise TeacherError(f"teacher checkpoint {path} does not fit timm model {name!r} with num_classes="
                           f"{num_classes}: {problems[0]}{more}{classes}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:  # e.g. dtype/layout problems the shape check above does not see
        raise TeacherError(f"teacher checkpoint {path} does not load into {name!r}: {exc}") from exc


# ------------------------------------------------------------------------------------------ provenance


def weights_sha256(path_or_model) -> str:
    """sha256 of a checkpoint file, or of a model's (or state dict's) tensors: names, dtypes, shapes, bytes."""
    if isinstance(path_or_model, (str, os.PathLike)):
        h = hashlib.sha256()
        with open(path_or_model, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    sd = path_or_model.state_dict() if isinstance(path_or_model, nn.Module) else path_or_model
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def teacher_resolution(teacher_cfg, image_size: int | None = None) -> int | None:
    """Side length the teacher sees: teacher.input_size, or the view size when that is null."""
    size = teacher_cfg.get("input_size")
    return int(size) if size else (int(image_size) if image_size else None)


def teacher_provenance(teacher_cfg, model: nn.Module, num_classes: int, image_size: int | None = None) -> dict:
    """What the cache records about its teacher. The weights hash is the checkpoint file's when one is
    configured and present, else that of the model's state dict (hub weights)."""
    ckpt = teacher_cfg.get("checkpoint")
    sha = weights_sha256(ckpt) if ckpt and Path(ckpt).is_file() else weights_sha256(model)
    out = {"name": str(teacher_cfg.name), "weights_sha256": sha, "num_classes": int(num_classes),
           "resolution": teacher_resolution(teacher_cfg, image_size),
           "mean": [float(v) for v in teacher_cfg.mean], "std": [float(v) for v in teacher_cfg.std]}
    kwargs = teacher_kwargs(teacher_cfg)
    if kwargs:  # only when set: stores built before teacher.kwargs existed keep their provenance (resume)
        out["kwargs"] = kwargs
    return out


# ------------------------------------------------------------------------------------------ inference


def model_input(images_u8: torch.Tensor, mean: Sequence[float], std: Sequence[float], *, device,
                size: int | Sequence[int] | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW views -> normalised float32 on `device`: /255, bilinear resize to `size` (no antialias,
    deterministic), then (x - mean) / std. Used by the teacher and the student (each with its own mean/std)."""
    if images_u8.dtype != torch.uint8:
        raise TypeError(f"model_input expects uint8 views, got {images_u8.dtype}")
    x = images_u8.to(device, non_blocking=True).float().div_(255.0)
    if size:
        hw = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
        if tuple(x.shape[-2:]) != hw:
            x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=False)
    m, s = _normalisation(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    x = x.sub_(m).div_(s)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@functools.lru_cache(maxsize=16)
def _normalisation(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """mean and std as float32 [1, C, 1, 1] on `device`, made once: building them per batch is a blocking
    host-to-device copy, which makes the host wait until the device has run everything queued before it."""
    with torch.inference_mode(False):  # normal tensors, usable in training steps too
        return (torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1),
                torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1))


def check_input(model: nn.Module, teacher_cfg, view_size: int) -> None:
    """What the teacher is fed, checked before any work (stage one, train_teacher): its normalisation, and the
    input size when the model takes one size only (a ViT/DeiT; timm would assert deep inside the forward)."""
    for key in ("mean", "std"):
        values = [float(v) for v in teacher_cfg[key]]
        if len(values) not in (1, 3):
            raise TeacherError(f"teacher.{key}={values}: expected 3 values (one per RGB channel) or 1")
    if not all(float(v) > 0 for v in teacher_cfg.std):
        raise TeacherError(f"teacher.std={[float(v) for v in teacher_cfg.std]}: every value must be > 0")
    size = teacher_resolution(teacher_cfg, view_size)
    source = "teacher.input_size" if teacher_cfg.get("input_size") else "the view size data.image_size"
    check_input_size(model, str(teacher_cfg.name), (size, size), f"{source}={size}")


def check_input_size(model: nn.Module, name: str, hw: Sequence[int], given: str) -> None:
    """Refuse inputs of `hw` (named by `given`) for a model that takes one size only, naming the fix."""
    fixed = fixed_input_size(model)
    if fixed and tuple(int(v) for v in hw) != fixed:
        raise TeacherError(f"teacher {name} takes {fixed[0]}x{fixed[1]} inputs only, it would be given "
                           f"{hw[0]}x{hw[1]} ({given}): set teacher.input_size={fixed[0]}")


class TeacherRunner:
    """Teacher inference on uint8 view batches: float32 logits [B, C] on `device`.

    CUDA: bf16 autocast (teacher.bf16), channels_last (teacher.channels_last), torch.compile (teacher.compile).
    CPU: fp32, contiguous (torch.compile still honoured if asked for: slow to compile).
    """

    def __init__(self, model: nn.Module, teacher_cfg, device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.mean, self.std = list(teacher_cfg.mean), list(teacher_cfg.std)
        self.size = teacher_cfg.get("input_size") or None
        self.bf16 = cuda and bool(teacher_cfg.get("bf16", False))
        self.channels_last = cuda and bool(teacher_cfg.get("channels_last", False))
        model = model.to(self.device).eval()
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.forward = torch.compile(model) if teacher_cfg.get("compile", False) else model
        self.cfg, self.name = teacher_cfg, str(teacher_cfg.name)

    def __call__(self, images_u8: torch.Tensor) -> torch.Tensor:
        return self._logits(images_u8, self.forward)

    def check(self, view_size: int) -> None:
        """Before any work (stage one: before its store exists): the input checks, then one forward of one blank
        view through the plain (uncompiled) model, so that a setting that fails only in a forward fails here."""
        check_input(self.model, self.cfg, view_size)
        self._logits(torch.zeros(1, 3, int(view_size), int(view_size), dtype=torch.uint8), self.model)

    def _logits(self, images_u8: torch.Tensor, forward) -> torch.Tensor:
        with torch.inference_mode():
            x = model_input(images_u8, self.mean, self.std, device=self.device, size=self.size,
                            channels_last=self.channels_last)
            check_input_size(self.model, self.name, x.shape[-2:], "its views")
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = forward(x)
            return logits.float()


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) a model accepts exclusively (ViT-style strict patch embedding, or timm's fixed_input_size), else None."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None and getattr(embed, "img_size", None) is not None:
        strict = getattr(embed, "strict_img_size", False) and not getattr(embed, "dynamic_img_pad", False)
        return tuple(int(v) for v in embed.img_size) if strict else None
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"][-2:])
    return None


def load_runner(teacher_cfg, num_classes: int, device, *, required: bool) -> TeacherRunner | None:
    """A runner for the configured teacher; None (not an error) when it cannot be loaded and is not required."""
    try:
        model = create_teacher(teacher_cfg, num_classes)
    except TeacherError:
        if required:
            raise
        return None
    return TeacherRunner(model, teacher_cfg, device)
