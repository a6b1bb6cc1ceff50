"""`python -m pipeline.train_teacher`: train the teacher on our shards (data without a pretrained teacher: toy,
Fashion-MNIST, custom classes); writes `teacher.checkpoint` (timm state dict) and `teacher.train.metrics`.

    python -m pipeline.train_teacher                                  # toy data, the toy recipe
    python -m pipeline.train_teacher data=fashion_mnist teacher.train.epochs=20
    torchrun --nproc-per-node=2 -m pipeline.train_teacher             # DDP; resumes from teacher.train.out_dir

The same loop as the student (pipeline.train.loop): per-epoch atomic checkpoints in `teacher.train.out_dir`,
auto-resume (`teacher.train.resume`), DDP under torchrun. User errors exit 2 with one line.
"""

import logging

from omegaconf import DictConfig

from pipeline import cli


def main(cfg: DictConfig) -> None:
    from pipeline.train.teacher_run import train_teacher

    m = train_teacher(cfg)
    if m:
        logging.getLogger("pipeline").info(
            f"teacher {m['teacher']}: val_acc {m['val_acc']:.4f} after {m['epochs']} epochs "
            f"({m['img_per_s']:.0f} img/s, {m['seconds']:.0f} s) -> {m['checkpoint']}")


KEYS = ('teacher.name', 'teacher.checkpoint', 'teacher.train.epochs', 'teacher.train.batch_size', 'teacher.train.lr', 'teacher.train.out_dir', 'teacher.train.resume', 'data.shards')

if __name__ == "__main__":
    cli.run("train_teacher", main, __doc__, KEYS)
