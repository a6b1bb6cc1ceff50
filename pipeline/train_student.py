"""`python -m pipeline.train_student`: stage two, a DeiT student on replayed views (pipeline.training).

    python -m pipeline.train_student                                   # toy data, distill=hard from the cache
    python -m pipeline.train_student distill=soft                      # top-K soft targets from the cache
    python -m pipeline.train_student distill=hard distill.source=online   # teacher in the loop, same views
    python -m pipeline.train_student distill=none                      # no teacher, no cache
    torchrun --nproc-per-node=2 -m pipeline.train_student              # DDP (gloo on CPU, NCCL on GPU)
    python -m pipeline.train_student train.resume=never                # start afresh (default: auto-resume)

Outputs in train.out_dir: student.pt (plain timm state dict), metrics.json, history.json, dvclive/,
checkpoint-last.pt / checkpoint-prev.pt. Known errors (provenance or digest mismatch, missing cache or
shards, a schedule beyond the cached seeds) exit with status 2 and one line on stderr.
"""

import hydra
from omegaconf import DictConfig

from pipeline.cli import fail_cleanly


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline import distributed
    from pipeline.training import train_student

    try:
        with fail_cleanly():
            train_student(cfg)
    finally:
        distributed.cleanup()


if __name__ == "__main__":
    main()
