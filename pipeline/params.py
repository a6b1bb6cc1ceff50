"""`python -m pipeline.params [overrides...]`: compose conf/ into params.yaml, as DVC's Hydra integration does.

`dvc exp run -S distill=soft` composes params.yaml itself (hydra.enabled in .dvc/config); plain `dvc repro`
only reads the committed params.yaml, so after editing conf/ run this (tests check the two agree).
"""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pipeline.config  # noqa: F401  (registers ${pipeline_checked:...}: composing conf/ validates it)

CONF = Path(__file__).resolve().parents[1] / "conf"


def composed(overrides: list[str] | None = None) -> dict:
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=list(overrides or []))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_container(cfg)


def main(argv: list[str]) -> None:
    cfg = OmegaConf.create(composed(argv))
    Path("params.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    print("params.yaml written", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
