"""`python -m pipeline.export`: the trained student as a timm model folder: `model.safetensors` + `config.json`
in timm's own Hub format (architecture, kwargs such as img_size/patch_size/depth, num_classes, class names, the
eval preprocessing: input_size, mean, std, crop_pct). timm then rebuilds it with no kwargs retyped:

    python -m pipeline.export                              # the run configured in pipeline/conf/ -> export.out
    python -m pipeline.export distill=soft                 # the soft student (export.checkpoint follows train.out_dir)
    python -m pipeline.export export.checkpoint=runs/student/<run>/student-ema.pt   # the EMA weights
    python -m pipeline.export export.push_to=<user>/<repo> # also upload to the Hugging Face Hub (needs a login)

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


def export_student(cfg: DictConfig) -> Path:
    """Write ``export.out`` (replacing a previous export only once the new one is complete); push when asked."""
    import torch

    from pipeline.errors import WriteError
    from pipeline.finished import missing_student
    from pipeline.models.student import export_config, load_student, push_timm, save_timm_folder

    ckpt, out = Path(cfg.export.checkpoint), Path(cfg.export.out)
    if not ckpt.is_file():
        raise missing_student(cfg, ckpt)
    num_classes, names = _classes(cfg, torch.load(ckpt, map_location="cpu", weights_only=True))
    model = load_student(cfg.student, num_classes, ckpt)
    model_args, data_config = export_config(cfg.student, num_classes, crop_pct=float(cfg.data.crop_pct),
                                            interpolation=str(cfg.augment.interpolation))
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
    log.info(f"student {ckpt} -> {out}: timm.create_model('local-dir:{out}', pretrained=True)")
    if cfg.export.push_to:
        url = push_timm(model, str(cfg.export.push_to), model_args, data_config, names)
        log.info(f"pushed to the Hugging Face Hub: {url}: timm.create_model('hf-hub:{cfg.export.push_to}', "
                 f"pretrained=True)")
    return out


def main(cfg: DictConfig) -> None:

    export_student(cfg)


KEYS = ('export.checkpoint', 'export.out', 'export.push_to', 'student.name', 'train.out_dir')

if __name__ == "__main__":
    cli.run("export", main, __doc__, KEYS)
