"""`python -m pipeline.verify_cache [cache.verify_fraction=0.05]`: replay a random subset of cached views, rerun
the teacher, report argmax agreement and the largest top-K logit difference; exit 1 unless all agree."""

import json

import hydra
from omegaconf import DictConfig

from pipeline.cli import fail_cleanly


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pipeline.cache_builder import verify_cache

    with fail_cleanly():
        fraction = float(cfg.cache.verify_fraction) or 0.05
        result = verify_cache(cfg, fraction)
        print(json.dumps(result, indent=2))
        if not result["ok"]:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
