"""What every bench shares: the composed project config, a machine description, JSON output."""

from __future__ import annotations

import json
import os
import platform
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_HYDRA = threading.Lock()  # Hydra's compose API keeps global state: one composition at a time

# The toy recipe the published benchmarks (docs/results.md: toy32 speed, the Fashion-MNIST study) measured: stronger
# augmentation and a deeper student than the toy demo's defaults. Benches pass these so that their commands
# measure what their tables say.
RECIPE_V1 = ["augment.rand_augment=rand-m6-mstd0.5-inc1", "augment.erase_prob=0.25", "student.kwargs.depth=4",
             "teacher.train.augment.rand_augment=null", "teacher.train.augment.erase_prob=0.0"]


def compose(overrides: list[str]):
    """pipeline/conf/config.yaml with Hydra ``overrides``, as the ``python -m pipeline.<stage>`` entries see it."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from pipeline.compose import CONF

    with _HYDRA, initialize_config_dir(str(CONF), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}"


def save_json(path: Path, res: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
