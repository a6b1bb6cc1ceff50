"""Train the teacher on our shards and write `teacher.checkpoint` (timm state dict) and `teacher.train.metrics`.

    python -m pipeline.train_teacher                       # toy data, regnety_toy recipe
    python -m pipeline.train_teacher data=fashion_mnist teacher.train.epochs=20

Errors (missing shards or manifest, class-count mismatch, an existing checkpoint without overwrite=true)
exit with status 2 and a one-line message.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from pipeline.shards import ShardError
from pipeline.teacher import TeacherError
from pipeline.teacher_training import train_teacher


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        m = train_teacher(cfg)
    except (TeacherError, ShardError, FileNotFoundError) as exc:
        print(f"train_teacher: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"teacher {m['teacher']}: val_acc {m['val_acc']:.4f} after {m['epochs']} epochs "
          f"({m['img_per_s']:.0f} img/s, {m['seconds']:.0f} s) -> {m['checkpoint']}")


if __name__ == "__main__":
    main()
