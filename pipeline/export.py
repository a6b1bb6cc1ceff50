"""`python -m pipeline.export`: the trained student (or teacher) as a timm model folder: `model.safetensors` +
`config.json` in timm's own Hub format (architecture, kwargs such as img_size/patch_size/depth, num_classes, class
names, the eval preprocessing: input_size, mean, std, crop_pct). timm then rebuilds it with no kwargs retyped:

    python -m pipeline.export                              # the run configured in pipeline/conf/ -> export.out
    python -m pipeline.export distill=soft                 # the soft student (export.checkpoint follows train.out_dir)
    python -m pipeline.export export.checkpoint=runs/student/<run>/student-ema.pt   # the EMA weights
    python -m pipeline.export export.push_to=<user>/<repo> # also upload to the Hugging Face Hub (needs a login)
    python -m pipeline.export export.model=teacher export.out=runs/export/teacher   # the teacher (teacher.checkpoint)

    timm.create_model("local-dir:runs/export/<run>", pretrained=True)   # or "hf-hub:<user>/<repo>"
"""

import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig

from pipeline import cli

log = logging.getLogger("pipeline")


def _classes(cfg: DictConfig, state_dict: dict) -> tuple[int, list[str] | None]:
    """(num_classes, class names): the train shards' manifest when present, else the checkpoint's head."""
    from pipeline.config import split_dir
    from pipeline.data.shards import MANIFEST, load_manifest

    if (split_dir(cfg, "train") / MANIFEST).is_file():
        m = load_manifest(split_dir(cfg, "train"))
        return m.num_classes, list(m.class_names)
    head = state_dict.get("head.weight")
    return (int(head.shape[0]) if head is not None else int(cfg.data.num_classes)), None


def _student(cfg: DictConfig):
    """(checkpoint, model, model_args, data_config, class names) of the student at ``export.checkpoint``."""
    from pipeline.finished import missing_student
    from pipeline.models.student import export_config, load_student
    from pipeline.models.weights import load_weights

    ckpt = Path(cfg.export.checkpoint)
    if not ckpt.is_file():
        raise missing_student(cfg, ckpt)
    num_classes, names = _classes(cfg, load_weights(ckpt, what="student checkpoint"))
    model = load_student(cfg.student, num_classes, ckpt)
    model_args, data_config = export_config(cfg.student, num_classes, crop_pct=float(cfg.data.crop_pct),
                                            interpolation=str(cfg.augment.interpolation))
    return ckpt, model, model_args, data_config, names


def _teacher(cfg: DictConfig):
    """The same for the teacher at ``teacher.checkpoint``; its eval preprocessing: the view (data.image_size,
    data.crop_pct) resized to teacher.input_size, with the teacher's own mean/std."""
    from pipeline.errors import TeacherError
    from pipeline.models.teacher import create_teacher, teacher_kwargs

    ckpt = Path(str(cfg.teacher.checkpoint)) if cfg.teacher.checkpoint else None
    if ckpt is None or not ckpt.is_file():
        raise TeacherError(f"teacher.checkpoint={cfg.teacher.checkpoint}: no trained teacher to export (train it "
                           f"with: python -m pipeline.train_teacher, or set teacher.checkpoint)")
    num_classes, names = _classes(cfg, {})
    model = create_teacher(cfg.teacher, num_classes)
    size = int(cfg.teacher.input_size or cfg.data.image_size)
    model_args = {"num_classes": num_classes, **teacher_kwargs(cfg.teacher)}
    data_config = {"input_size": (3, size, size), "mean": tuple(float(v) for v in cfg.teacher.mean),
                   "std": tuple(float(v) for v in cfg.teacher.std), "crop_pct": float(cfg.data.crop_pct),
                   "interpolation": str(cfg.augment.interpolation), "crop_mode": "center"}
    return ckpt, model, model_args, data_config, names


def export_model(cfg: DictConfig) -> Path:
    """Write ``export.out`` (replacing a previous export only once the new one is complete); push when asked."""
    from pipeline.errors import WriteError
    from pipeline.models.student import push_timm, save_timm_folder

    what = str(cfg.export.model)
    ckpt, model, model_args, data_config, names = (_teacher if what == "teacher" else _student)(cfg)
    out = Path(cfg.export.out)
    tmp, old = out.with_name(f".{out.name}.tmp{os.getpid()}"), out.with_name(f".{out.name}.old{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        save_timm_folder(model, tmp, model_args, data_config, names)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as e:
        raise WriteError(f"{out}: cannot write the export: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    log.info(f"{what} {ckpt} -> {out}: timm.create_model('local-dir:{out}', pretrained=True)")
    if cfg.export.push_to:
        url = push_timm(model, str(cfg.export.push_to), model_args, data_config, names)
        log.info(f"pushed to the Hugging Face Hub: {url}: timm.create_model('hf-hub:{cfg.export.push_to}', "
                 f"pretrained=True)")
    return out


def main(cfg: DictConfig) -> None:
    export_model(cfg)


KEYS = ('export.model', 'export.checkpoint', 'export.out', 'export.push_to', 'student.name', 'teacher.checkpoint',
        'train.out_dir')

if __name__ == "__main__":
    cli.run("export", main, __doc__, KEYS)
