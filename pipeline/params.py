"""`python -m pipeline.params [overrides]`: print the composed configuration (YAML, every key); nothing is written.

    python -m pipeline.params                          # pipeline/conf/ as every command composes it
    python -m pipeline.params data=imagenet train=deit # the same with overrides
    python -m pipeline.params --write                  # params.yaml for `dvc repro`: pipeline/conf/dvc.yaml composed

`dvc exp run -S key=value` composes params.yaml itself (hydra.enabled, config_name dvc in .dvc/config); plain
`dvc repro` reads the committed params.yaml, so after editing pipeline/conf/ run `--write` (a test checks they agree).
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from pipeline import cli

DVC_CONFIG = "dvc"  # pipeline/conf/dvc.yaml: what DVC composes into params.yaml
WRITE = "--write"


def composed(overrides: list[str] | None = None, config_name: str = "config") -> dict:
    """pipeline/conf/<config_name> with ``overrides``, checked and resolved, as plain containers."""
    from pipeline.compose import compose
    from pipeline.config import validate

    cfg = compose(list(overrides or []), config_name=config_name)
    validate(cfg)
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg)


def main(argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return
    with cli.stage("params"):
        write = WRITE in argv
        text = OmegaConf.to_yaml(composed([a for a in argv if a != WRITE], DVC_CONFIG if write else "config"))
        if not write:
            sys.stdout.write(text)
            return
        from pipeline.atomic import atomic_write_text

        atomic_write_text(Path("params.yaml"), text)
        print("params.yaml written", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
