"""Write the train and val shards of ``cfg.data`` into ``cfg.data.shards/{train,val}``.

    python -m pipeline.make_shards data=toy workdir=.
    python -m pipeline.make_shards data=fashion_mnist
    python -m pipeline.make_shards data=folder data.root=/path/to/tree data.num_classes=100

Re-running with the same input verifies and keeps the shards ("up to date"); a different shard set is refused
unless ``overwrite=true``. Errors (bad input, corrupt data, refused overwrite) exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue
from tqdm import tqdm

from .shards import ShardError, write_shards
from .sources import SPLITS, from_config


def make_shards(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg.data, resolve=True, throw_on_missing=True)
    manifests = {}
    for split in SPLITS:
        samples = from_config(data, split)
        out = Path(data["shards"]) / split
        progress = tqdm(samples, total=len(samples), unit="img", desc=f"{data['name']}/{split}",
                        dynamic_ncols=True, file=sys.stderr)
        manifests[split] = write_shards(
            progress, out, n=len(samples), split=split, shard_size=data["shard_size"],
            num_classes=data["num_classes"], class_names=samples.class_names, source=samples.source,
            overwrite=bool(cfg.overwrite),
        )
    return manifests


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        make_shards(cfg)
    except (ShardError, FileNotFoundError, ValueError, MissingMandatoryValue) as exc:
        msg = f"{exc.full_key} is not set (???)" if isinstance(exc, MissingMandatoryValue) else exc
        print(f"make_shards: error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
