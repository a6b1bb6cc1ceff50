"""`python -m pipeline.teacher_cache`: stage one, teacher targets per view into Zarr (resumable).

    python -m pipeline.teacher_cache                      # one process (CPU or one GPU)
    torchrun --nproc-per-node=8 -m pipeline.teacher_cache # units round-robin over ranks
    python -m pipeline.teacher_cache overwrite=true       # rebuild
    python -m pipeline.teacher_cache cache.verify_fraction=0.05
"""

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pipeline.cli import fail_cleanly


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline import cache_builder, distributed

    with fail_cleanly():
        summary = cache_builder.build_cache(cfg)
        if float(cfg.cache.verify_fraction) > 0:
            distributed.cleanup()
            summary["verify"] = check = cache_builder.verify_cache(cfg, float(cfg.cache.verify_fraction))
            print(json.dumps(check), file=sys.stderr)
            if not check["ok"]:
                raise SystemExit(f"teacher cache re-check failed: {check}")
        if "path" in summary:  # rank 0
            print(cache_builder.format_summary(summary))
            out = Path(cfg.cache.metrics)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(summary, indent=2))
        distributed.cleanup()


if __name__ == "__main__":
    main()
