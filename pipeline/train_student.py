"""`python -m pipeline.train_student`: stage two, a DeiT student on replayed views (pipeline.train).

    python -m pipeline.train_student                                   # toy data, distill=hard from the cache
    python -m pipeline.train_student distill=soft                      # top-K soft targets from the cache
    python -m pipeline.train_student distill=hard distill.source=online   # teacher in the loop, same views
    python -m pipeline.train_student distill=none                      # no teacher, no cache
    torchrun --nproc-per-node=2 -m pipeline.train_student              # DDP (gloo on CPU, NCCL on GPU)
    python -m pipeline.train_student train.resume=never                # start afresh (default: auto-resume)

Outputs in train.out_dir: student.pt (plain timm state dict), metrics.json, history.json, dvclive/,
checkpoint-last.pt / checkpoint-prev.pt. User errors (provenance or digest mismatch, missing cache or shards, a
schedule beyond the cached seeds, a bad config value) exit 2 with one line on stderr.
"""

from omegaconf import DictConfig

from pipeline import cli


def main(cfg: DictConfig) -> None:
    from pipeline.train.student_run import train_student

    train_student(cfg)


KEYS = ('distill.mode', 'distill.source', 'student.name', 'train.epochs', 'train.batch_size', 'train.lr', 'train.out_dir', 'train.resume', 'cache.path', 'cache.cycle')

if __name__ == "__main__":
    cli.run("train_student", main, __doc__, KEYS)
