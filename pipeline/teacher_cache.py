"""`python -m pipeline.teacher_cache`: stage one, teacher targets per view into Zarr (resumable).

    python -m pipeline.teacher_cache                      # one process (CPU or one GPU: cache.device)
    torchrun --nproc-per-node=8 -m pipeline.teacher_cache # units round-robin over ranks
    python -m pipeline.teacher_cache overwrite=true       # rebuild
    python -m pipeline.teacher_cache cache.verify_fraction=0.05   # then re-check 5% of views with the teacher
    python -m pipeline.teacher_cache cache.resume_check=full      # resume re-checks every done unit's bytes
"""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig

from pipeline import cli


def main(cfg: DictConfig) -> None:
    from pipeline import distributed
    from pipeline.atomic import atomic_write_text
    from pipeline.cache.builder import build_cache, format_summary
    from pipeline.cache.audit import verify_cache

    summary = build_cache(cfg)
    if float(cfg.cache.verify_fraction) > 0:
        distributed.cleanup()
        summary["verify"] = check = verify_cache(cfg, float(cfg.cache.verify_fraction))
        logging.getLogger("pipeline").info(json.dumps(check))
        if not check["ok"]:
            raise SystemExit(f"teacher cache re-check failed: {check}")
    if "path" in summary:  # rank 0
        print(format_summary(summary))
        metrics = Path(cfg.cache.metrics)
        if summary["units_computed"] == 0 and metrics.is_file():  # nothing to do: keep the build's numbers
            logging.getLogger("pipeline").info(f"nothing to compute: {metrics} keeps the last build's metrics")
        else:  # flat, for dvc metrics: the per-array bytes and the provenance stay in the store (verify_cache)
            flat = {"bytes_per_view": summary.get("total"), "img_per_s": summary["img_per_s"],
                    "seconds": summary["seconds"], "views": summary["views_written"]}
            atomic_write_text(metrics, json.dumps(flat, indent=2) + "\n")


KEYS = ('cache.path', 'cache.num_seeds', 'cache.topk', 'cache.batch_size', 'cache.num_workers', 'cache.device', 'cache.verify_fraction', 'cache.resume_check', 'teacher.name', 'teacher.checkpoint', 'augment.rand_augment', 'run_seed', 'overwrite')

if __name__ == "__main__":
    cli.run("teacher_cache", main, __doc__, KEYS)
